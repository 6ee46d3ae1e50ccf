"""Factories that fail in the ways users' code fails (for the fault tests)."""

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def digits_like(n: int = 256, features: int = 8, classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    return TensorDataset(x, torch.randint(classes, (n,), generator=g))


def good_model(features: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def dropout_model(features: int = 8, classes: int = 3, p: float = 0.3) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Dropout(p),
                         nn.Linear(16, classes))


def raising_model() -> nn.Module:
    raise ValueError("boom in the model factory")


def not_a_module() -> int:
    return 42


def class_not_instance() -> type:
    return torch.nn.Linear  # a trial's factory returned its class


def no_params() -> nn.Module:
    return nn.Sequential(nn.ReLU())


def frozen_model() -> nn.Module:
    m = good_model()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def shape_mismatch_model() -> nn.Module:
    return nn.Linear(5, 3)


class _NaN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * float("nan")


def nan_model() -> nn.Module:
    return _NaN()


class _Zero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * 0.0


def zero_grad_model() -> nn.Module:
    return _Zero()


def vector_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def shifted_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy minus 5: the same gradients, a negative loss (an NLL or ELBO can be)."""
    return torch.nn.functional.cross_entropy(outputs, targets) - 5.0


def raising_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("loss exploded")


def empty_data() -> TensorDataset:
    return TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))


def not_a_dataset() -> int:
    return 5


class _Triples(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.zeros(8), 0, 1


def triples() -> Dataset:
    return _Triples()


class _Ragged(Dataset):
    """Items whose inputs differ in length: they do not stack into a batch."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        return torch.zeros(8 + i % 2), 0


def ragged_data() -> Dataset:
    return _Ragged()


class _BrokenItem(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        if i > 0:
            raise IndexError(f"record {i} is missing")
        return torch.zeros(8), 0


def broken_item_data() -> Dataset:
    return _BrokenItem()


def tiny_data() -> TensorDataset:
    return digits_like(n=6)


def raising_data() -> TensorDataset:
    raise OSError("cannot open /data/train")


class _FakeOOM(nn.Module):
    """Raises a CUDA-style out-of-memory error above ``threshold`` examples."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.net = good_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.threshold:
            raise RuntimeError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (batch {x.shape[0]})"
            )
        return self.net(x)


def oom_model(threshold: int = 16) -> nn.Module:
    return _FakeOOM(threshold)


def bn_model(features: int = 8, classes: int = 3, frozen: bool = False,
             evaluated: bool = False) -> nn.Module:
    """BatchNorm1d: cannot train at batch 1, forces the micro-batch probe. ``frozen``: the
    BatchNorm layer in eval mode with its affine parameters frozen (fine-tuning's idiom);
    ``evaluated``: the whole model left in eval mode."""
    model = nn.Sequential(nn.Linear(features, 16), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Linear(16, classes))
    if frozen:
        model[1].eval().requires_grad_(False)
    return model.eval() if evaluated else model


class Output:
    """What a Hugging Face model returns: an object with logits and, given labels, a loss."""

    def __init__(self, logits: torch.Tensor, loss: torch.Tensor | None) -> None:
        self.logits = logits
        self.loss = loss


class ObjectOutputModel(nn.Module):
    def __init__(self, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.net(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(logits, loss)


def object_output_model() -> nn.Module:
    return ObjectOutputModel()


class _Rows(Dataset):
    """Hugging Face-style dict items: the inputs under their own keys, the target under
    "labels" (or under "label" with ``key="label"``)."""

    def __init__(self, key: str = "labels", target: bool = True) -> None:
        self.base = digits_like()
        self.key, self.target = key, target

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        row = {"features": x[:4], "extra": x[4:]}
        return {**row, self.key: y} if self.target else row


def dict_rows(key: str = "labels", target: bool = True) -> Dataset:
    return _Rows(key, target)


class _KeywordModel(nn.Module):
    """Takes its inputs as keyword arguments, as Hugging Face models do; with ``labels``
    it returns {"loss", "logits"} (for ``loss: model``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, features: torch.Tensor, extra: torch.Tensor,
                labels: torch.Tensor | None = None) -> object:
        logits = self.a(features) + torch.tanh(self.b(extra))
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def keyword_model() -> nn.Module:
    return _KeywordModel()


class _Sentences(Dataset):
    """Token sequences of different lengths (3 to 2 + ``lengths``) with a class each: they
    do not stack without padding."""

    def __init__(self, n: int = 96, lengths: int = 7) -> None:
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(1, 50, (3 + i % lengths,), generator=g) for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"input_ids": self.rows[i], "label": int(self.rows[i][0]) % 3}


def sentences(n: int = 96, lengths: int = 7) -> Dataset:
    return _Sentences(n, lengths)


def pad(items: list[dict[str, object]]) -> dict[str, torch.Tensor]:
    """Pad input_ids with 0 to the longest in the batch, with the attention mask."""
    ids = nn.utils.rnn.pad_sequence([r["input_ids"] for r in items],  # type: ignore[misc]
                                    batch_first=True)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(),
            "labels": torch.tensor([r["label"] for r in items])}


def pad_pairs(items: list[dict[str, object]]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = pad(items)
    return batch["input_ids"], batch["labels"]


def raising_collate(items: list[object]) -> object:
    raise ValueError("no tokenizer loaded")


def scalar_collate(items: list[object]) -> object:
    return 3


class _BagOfWords(nn.Module):
    """Mean embedding over the unmasked tokens, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = (attention_mask if attention_mask is not None else input_ids != 0).float()
        pooled = (self.emb(input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.out(pooled)


def bag_of_words() -> nn.Module:
    return _BagOfWords()


class _RaisesAtBatch(nn.Module):
    """Raises in forward on a batch of ``n`` examples only (as a model with a shape bug
    the probe's batches never meet)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.lin = n, nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.n:
            raise RuntimeError(f"shape '[{self.n // 4}, -1, 3]' is invalid")
        return self.lin(x)


def raises_at_batch(n: int = 8) -> nn.Module:
    return _RaisesAtBatch(n)


def pad_dict_pairs(items: list[dict[str, object]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A collate returning (inputs dict, targets), as some users' collators do."""
    batch = pad(items)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, \
        batch["labels"]


class _OneDict(nn.Module):
    """Takes its inputs as one dict argument (pair items whose input is a dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lin(torch.cat([inputs["features"], inputs["extra"]], dim=1))


def one_dict_model() -> nn.Module:
    return _OneDict()


class _DictPairs(Dataset):
    def __init__(self) -> None:
        self.base = digits_like()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x, y = self.base[i]
        return {"features": x[:4], "extra": x[4:]}, y


def dict_pairs() -> Dataset:
    return _DictPairs()


def pad_lm(items: list[dict[str, object]]) -> dict[str, torch.Tensor]:
    """A causal LM's batch: input ids padded with 0, labels the ids padded with -100."""
    ids = nn.utils.rnn.pad_sequence([r["input_ids"] for r in items],  # type: ignore[misc]
                                    batch_first=True)
    labels = nn.utils.rnn.pad_sequence([r["input_ids"] for r in items],  # type: ignore[misc]
                                       batch_first=True, padding_value=-100)
    return {"input_ids": ids, "labels": labels}


class _TinyLM(nn.Module):
    """Next-token logits from an embedding; its own loss is a mean over the batch's
    counted tokens, as a Hugging Face causal LM's."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(50, 8), nn.Linear(8, 50)

    def forward(self, input_ids: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.out(self.emb(input_ids))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
        return out


def tiny_lm() -> nn.Module:
    return _TinyLM()


def identity_collate(items: list[object]) -> object:
    return items


class _OldStyleScale(torch.autograd.Function):
    """y = x·w with its own backward, in the old style (no setup_context): torch.func,
    and so the per-example fallback, cannot run it; plain autograd can."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)  # type: ignore[attr-defined]
        return x * w

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * w, (grad * x).sum(0)


class _Scaled(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _OldStyleScale.apply(x, self.w)  # type: ignore[no-any-return]


def custom_function_model(features: int = 8, classes: int = 3) -> nn.Module:
    """good_model behind a module whose parameter goes through an old-style Function."""
    return nn.Sequential(_Scaled(features), nn.Linear(features, classes))


class _TupleOut(nn.Module):
    """(aux, logits): a tuple, and no labels= to take (loss: model cannot help)."""

    def __init__(self, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.aux, self.net = nn.Linear(features, 2), nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.aux(x), self.net(x)


def tuple_output_model() -> nn.Module:
    return _TupleOut()


class MarkupOpt(torch.optim.SGD):
    """An optimizer whose step fails with text that looks like rich markup."""

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        raise RuntimeError("state for param [/group] missing")


def constant_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Requires grad, but depends on no parameter: no gradient reaches the model."""
    return torch.tensor(1.0, requires_grad=True)


def detached_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets).detach()


def one_item_data() -> TensorDataset:
    return digits_like(n=1)


class _Exits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise SystemExit(4)


def exiting_model() -> nn.Module:
    return _Exits()


class _Chatty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("forward of", tuple(x.shape))
        return self.l(x)


def printing_model() -> nn.Module:
    print("building the model")
    return _Chatty()


class _Multiline(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("first line\n  second line\nthird line")


def multiline_model() -> nn.Module:
    return _Multiline()


class _Bare(nn.Module):
    def __init__(self, error: type[Exception]) -> None:
        super().__init__()
        self.l = nn.Linear(8, 3)
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.error  # no message, as Python's own MemoryError


def no_memory_model() -> nn.Module:
    return _Bare(MemoryError)


def bare_error_model() -> nn.Module:
    return _Bare(LookupError)


class _SecondForwardOom(nn.Module):
    """Runs out of memory from its second forward on (validate's per-example pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.l(x)


def second_forward_oom_model() -> nn.Module:
    return _SecondForwardOom()


class _TextRows(_Rows):
    """dict_rows with the raw text left in, as a tokenized dataset keeps it."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "text": f"row {i}"}  # type: ignore[dict-item]


def text_rows() -> Dataset:
    return _TextRows()


class _SwallowingModel(_KeywordModel):
    """Takes **kwargs, as Hugging Face models do: a text column goes in unnoticed."""

    def forward(self, features: torch.Tensor, extra: torch.Tensor,  # type: ignore[override]
                labels: torch.Tensor | None = None, **kwargs: object) -> object:
        return super().forward(features, extra, labels)


def swallowing_model() -> nn.Module:
    return _SwallowingModel()


def regression_rows(n: int = 64) -> Dataset:
    """(8 features, one float target of either sign) pairs: a regression problem."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, 3.0 * x[:, 0] - 1.0)


class _OneOutput(nn.Module):
    """One output per example, squeezed to (B,) as regression models often do."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x).squeeze(-1)


def one_output_model() -> nn.Module:
    return _OneOutput()


def rows_from_file(path: str = "rows.csv") -> Dataset:
    """(8 features, a class) rows read from a CSV file, relative to the current folder as
    user code reads it."""
    import numpy as np

    a = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return torch.utils.data.TensorDataset(torch.from_numpy(a[:, :8]),
                                          torch.from_numpy(a[:, 8]).long())


def rows_in_folder(root: str = "rows") -> Dataset:
    """Rows from the CSV files of a folder, read relative to the current folder."""
    import os

    files = sorted(os.listdir(root))
    return rows_from_file(os.path.join(root, files[0]))


def signed_soft_rows(n: int = 64) -> Dataset:
    """(8 features, 3 float targets of either sign): "soft labels" that are no
    probabilities, for good_model's 3 outputs."""
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 8, generator=g),
                                          torch.randn(n, 3, generator=g) - 2.0)
