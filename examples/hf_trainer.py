# examples/hf_trainer.py: the noise scale in a Hugging Face Trainer's logs.
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from bsfind.integrations.transformers import NoiseScaleCallback


class Tokens(torch.utils.data.Dataset):  # label: does the sequence hold a token below 8?
    def __init__(self, n: int = 1024) -> None:
        self.ids = torch.randint(1, 64, (n, 16), generator=torch.Generator().manual_seed(0))
        self.labels = (self.ids < 8).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


torch.manual_seed(0)
config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=16, num_labels=2)
model = BertForSequenceClassification(config)  # a tiny model from a config: random weights
args = TrainingArguments(output_dir="hf-out", per_device_train_batch_size=16,
                         gradient_accumulation_steps=2, num_train_epochs=2, logging_steps=8,
                         learning_rate=1e-3, report_to="none", save_strategy="no",
                         use_cpu=True, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=Tokens())
callback = NoiseScaleCallback.attach(trainer, log_path="noise.jsonl")  # first: report_to logs it
trainer.train()
print(callback.tracker.latest)  # the last record; logged as bsfind/b_simple, bsfind/examples, ...
