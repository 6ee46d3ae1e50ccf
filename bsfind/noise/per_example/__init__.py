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
                fewer FLOPs (see :func:`_use_gram`); bias |Σ_t δ_it|².
conv1d/conv2d   the linear rule on the unfolded input (im2col), per group;
                bias |Σ_positions δ|².
embedding       δ summed over equal indices within the example (scatter-sum),
                then squared; padding_idx rows get no gradient.
layernorm,      weight Σ δ·x̂, bias Σ δ (sums over every axis but the batch and
groupnorm,      the affine ones), x̂ the normalised input recomputed from x.
rmsnorm
func            any other leaf module: torch.func, vmap over examples of the vjp
                of ``functional_call(module, params, x_i[None])`` with δ_i.
==============  =================================================================

Limitations, each reported rather than answered wrongly: BatchNorm in training
mode mixes examples (no per-example gradient exists); a parameter on a module
that also has parameterised children, or shared by two modules (tied weights),
is refused by :func:`plan`; a module that receives two gradients in one backward
(called twice in the forward, or two forwards back-propagated together) makes
:meth:`PerExampleGradNorms.sq_norms` raise :class:`PerExampleUnsupported`, as
does a fallback module whose one-example outputs differ from its batched ones.
Not detectable by hooks, hence the caller's responsibility: a parameter used
outside its module's ``forward`` (e.g. ``logits = h @ model.tok.weight.T``), or
a module called through ``.forward()`` instead of ``__call__``; both make the
sum silently miss that use.

Cost: for Linear on inputs with middle axes and for convolutions the direct form
forms every example's weight gradient x_iᵀ δ_i. Their sum is the weight gradient, so
while the context is active those layers run as a custom autograd Function
(:class:`_FusedProduct`) whose backward returns that sum instead of letting autograd
form the same product a second time ("fused"; ``fuse=False`` turns it off). What is
left is the per-example product's lower efficiency as a batched GEMM, the im2col copy
for convolutions, and a fixed cost of a few small ops per layer. The Gram form, and
the rank-one rule of 2-D Linear inputs, cost a fraction of the layer's training FLOPs.
On CPU, temporaries live in buffers reused across backward passes and are chunked to
stay in cache. ``benchmarks/per_example_overhead.py`` measures all of it.
"""

from bsfind.noise.per_example.hooks import PerExampleGradNorms
from bsfind.noise.per_example.plan import PerExamplePlan, PerExampleUnsupported, plan
from bsfind.noise.per_example.rules import CPU_TEMP_ELEMENTS, MAX_TEMP_ELEMENTS, LinearPath

__all__ = [
    "CPU_TEMP_ELEMENTS",
    "MAX_TEMP_ELEMENTS",
    "LinearPath",
    "PerExampleGradNorms",
    "PerExamplePlan",
    "PerExampleUnsupported",
    "plan",
]
