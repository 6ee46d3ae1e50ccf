"""Per-example gradient norms from forward/backward hooks (DESIGN.md §2).

After ONE ordinary forward + backward of a batch, :class:`PerExampleGradNorms`
gives, for every example i, the squared L2 norm of example i's contribution to
the accumulated ``.grad`` (summed over all trainable parameters). With a loss
that is a mean over B examples that contribution is (1/B)·∇L_i; the caller
rescales. No per-example gradient is ever materialised for the whole model:
each layer's norm is computed inside its backward hook and the inputs it
needed are dropped with the graph.

Rules (Goodfellow 2015, arXiv:1510.01799; Gray et al. 2024, arXiv:2411.00999),
with x a layer's input and δ = ∂loss/∂output:

==============  =================================================================
rule            squared norm of example i's gradient
==============  =================================================================
linear          2-D input: |x_i|²·|δ_i|² (+ |δ_i|² for the bias). Inputs with
                middle axes (B, T..., d_in): |x_iᵀ δ_i|²_F, directly or through
                the Gram form Σ_t,t' (x_it·x_it')(δ_it·δ_it'), whichever costs
                fewer FLOPs (see :func:`.rules.use_gram`); bias |Σ_t δ_it|².
transposed_     the same for ``x @ W + b`` with W (in, out): transformers'
linear          ``Conv1D`` (GPT-2), recognised without importing transformers.
conv1d/conv2d   the linear rule on the unfolded input (im2col), per group;
                bias |Σ_positions δ|².
embedding       δ summed over equal indices within the example (scatter-sum),
                then squared; padding_idx rows get no gradient.
layernorm,      weight Σ δ·x̂, bias Σ δ (sums over every axis but the batch and
groupnorm,      the affine ones), x̂ the normalised input recomputed from x.
rmsnorm
attention       nn.MultiheadAttention (batch_first=True): self- and cross-
                attention, kdim/vdim, attn_mask, key_padding_mask, is_causal,
                need_weights, dropout in training. Its forward's
                ``F.multi_head_attention_forward`` call is routed (a torch
                function mode) through the same ops with each projection a
                captured Linear: in_proj's q/k/v (or q/kv) slices are disjoint,
                so their norms add; out_proj is one more Linear (:mod:`.attention`).
broadcast       a parameter of shape (1, ...) of a module that also has
                parameterised children (a ViT's cls_token, pos_embed): swapped
                for its expand(B, ...) during that module's forward; row i of
                its gradient is example i's.
func            any other leaf module: torch.func, vmap over examples of the vjp
                of ``functional_call(module, params, x_i[None])`` with δ_i.
==============  =================================================================

Tied input/output embeddings (Embedding layers sharing their weight with at most one
Linear head: GPT-2, BERT's MLM decoder, T5): each module's own rule, plus the cross
terms 2⟨A_e,i, C_i⟩ = 2 Σ_t' δe_t'·(Σ_t δh_{t,idx_t'} h_t) and, between two Embedding
calls, 2 Σ_t,s [idx_t = idx'_s] δe_t·δe'_s, never forming a V×d matrix (:mod:`.tied`).
A module given an input of batch size 1 that the forward broadcasts (position ids
(1, T), as GPT-2 and BERT build them) runs again on that input expanded to the model's
batch (read from the root module's first tensor argument); where the forward then
raises a shape error, it runs again without, and that module is refused. Expanded
tensors, and the outputs of modules given indices made in the forward with the batch's
length on dim 0 (``torch.arange(T)`` with T = B), are checked once per
PerExampleGradNorms (:mod:`.broadcast`): two more backward passes through the first
forward's graph, with a cotangent on one example's outputs, must not reach other
examples' rows; a tensor that does (``pos_embed[0]``) is refused on every batch.

Refused, each with a message naming the module, the parameter and what would make it
work (:func:`plan`, before any run; the first obstacle in model order): BatchNorm in
training mode (it mixes examples; use the micro-batch form); any other parameter owned
by a module whose children own parameters (give it a leading dimension of 1, or move it
into a submodule of its own); any other sharing of a parameter (untie it); an
nn.MultiheadAttention with batch_first=False (dim 0 is then the sequence: set
batch_first=True), add_bias_kv or add_zero_attn; a module the fallback cannot run.
At run time, :meth:`PerExampleGradNorms.sq_norms` raises
:class:`PerExampleUnsupported` for: a module that receives two gradients in one backward
(called twice in the forward, or two forwards back-propagated together); a fallback
module whose one-example outputs differ from its batched ones (random or mixing); a
module whose input's dim 0 is not the batch (named, with the fix); an expanded tensor
that the forward does not broadcast; a parameter registered on a module and its child
that the module also uses itself. Not detectable by hooks, hence the caller's
responsibility: a parameter used outside any module's ``forward`` (e.g. ``logits = h @
model.tok.weight.T``), or a module called through ``.forward()`` instead of
``__call__``; both make the sum silently miss that use. The broadcast check needs the
root's output to carry the batch on dim 0 (a model returning only a scalar loss is not
checked).

Cost: for Linear on inputs with middle axes and for convolutions the direct form
forms every example's weight gradient x_iᵀ δ_i. Their sum is the weight gradient, so
while the context is active those layers run as a custom autograd Function
(:class:`.fused.FusedProduct`) whose backward returns that sum instead of letting autograd
form the same product a second time ("fused"; ``fuse=False`` turns it off). What is
left is the per-example product's lower efficiency as a batched GEMM, the im2col copy
for convolutions, and a fixed cost of a few small ops per layer. The Gram form, and
the rank-one rule of 2-D Linear inputs, cost a fraction of the layer's training FLOPs.
On CPU, temporaries live in buffers reused across backward passes and are chunked to
stay in cache. ``benchmarks/per_example_overhead.py`` measures all of it. The newer
constructs add: for a tied weight, T·T'·d multiply-adds per example and Embedding call
(chunked); for a batch-1 input, its module run again at the full batch; for the first
forward of a context with expanded tensors, two extra backward passes (the check); for
nn.MultiheadAttention, a Python dispatch per torch call inside its forward (the function
mode) and one copy of its output into torch's own layout.
"""

from bsfind.noise.per_example.hooks import PerExampleGradNorms, checking_batch
from bsfind.noise.per_example.plan import (
    PerExamplePlan,
    PerExampleUnsupported,
    TiedWeight,
    plan,
)
from bsfind.noise.per_example.rules import CPU_TEMP_ELEMENTS, MAX_TEMP_ELEMENTS, LinearPath

__all__ = [
    "CPU_TEMP_ELEMENTS",
    "MAX_TEMP_ELEMENTS",
    "LinearPath",
    "PerExampleGradNorms",
    "PerExamplePlan",
    "PerExampleUnsupported",
    "TiedWeight",
    "checking_batch",
    "plan",
]
