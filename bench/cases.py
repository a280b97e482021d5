"""What the benchmarks run: the cases (shapes, dtypes) per size, and per case the variants.

A variant is a *factory*: calling it builds what the variant needs (compiles, allocates) and returns the
closure that one timed round calls (one forward+backward of a loss, one forward of attention or of the
truncated teacher, one LEAP training step). Building lazily keeps one variant's failure (say, torch.compile
on an unsupported setup) from hiding the others. The pytest-benchmark suite (bench/test_bench_*.py) and the
CSV scripts (bench_feature_loss.py, bench_attention.py, bench_cpu.py) build their variants here and time
them with bench/harness.py.

Sizes: ``full`` is the paper's per-GPU step (GPU), ``small`` a quarter of the CPU targets' token count (so
that ``pytest bench/`` takes about a minute on 2 cores), ``smoke`` tiny shapes that only check the plumbing.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

import leap_kernels
from leap_kernels.ops.naive import (
    fused_feature_loss_reference,
    teacher_attention_reference,
    token_normalized_mse_reference,
)
from leap_kernels.ops.teacher_attention import split_qkv, teacher_attention_torch

Factory = Callable[[], Callable[[], object]]

SIZES = ("full", "small", "smoke")


# ----------------------------------------------------------------------------- fused loss


@dataclasses.dataclass(frozen=True)
class LossCase:
    """One loss benchmark: ``op`` is "mse" / "token-mse" (fused_feature_loss, plain or token-normalized) or
    "token-norm-only" (token_normalized_mse alone, ``d_s`` unused)."""

    name: str
    op: str
    m: int
    d_s: int
    d_t: int
    dtype: torch.dtype


def _loss_cases(m: int, d_s: int, d_t: int, dtype: torch.dtype, tag: str, with_192: bool = False) -> list[LossCase]:
    cases = [LossCase(f"{op}-{tag}-M{m}-{d_s}x{d_t}", op, m, d_s, d_t, dtype) for op in ("mse", "token-mse")]
    if with_192:
        cases.append(LossCase(f"mse-{tag}-M{m}-192x{d_t}", "mse", m, 192, d_t, dtype))
    cases.append(LossCase(f"token-norm-only-{tag}-M{m}-D{d_t}", "token-norm-only", m, 0, d_t, dtype))
    return cases


LOSS_CASES = {
    # The paper's per-GPU step: M = 128 * 256 student tokens, ViT-S (384) / ViT-T (192) -> ViT-g (1536).
    "full": _loss_cases(128 * 256, 384, 1536, torch.bfloat16, "bf16", with_192=True),
    "small": _loss_cases(8 * 256, 384, 1536, torch.float32, "fp32"),
    "smoke": _loss_cases(2 * 257, 64, 256, torch.float32, "fp32"),
}


def forced(factory: Factory, backend: str) -> Factory:
    """``factory`` with every call of its closure run under ``leap_kernels.use_backend(backend)``
    (backward included: the override is process-wide)."""

    def build():
        run = factory()

        def wrapped():
            with leap_kernels.use_backend(backend):
                return run()

        return wrapped

    return build


def feature_loss_variants(
    op: str, m: int, d_s: int, d_t: int, dtype: torch.dtype, device: torch.device, compile_backend: str = "inductor"
) -> dict[str, Factory]:
    """Variants of one fwd+bwd of a loss on random inputs (fixed seed).

    ``eager``: the plain PyTorch reference (leap_kernels.ops.naive) with autograd; ``compile``:
    ``torch.compile(fullgraph=True)`` of the same reference; ``ours``: the leap_kernels op
    (automatic backend; wrap with :func:`forced` for one backend); ``gemm-floor`` (not for
    "token-norm-only"): the three GEMMs of forward+backward alone, a lower bound.

    Shapes: student ``(m, d_s)``, weight ``(d_t, d_s)``, bias ``(d_t,)``, target ``(m, d_t)``;
    "token-norm-only": input and target ``(m, d_t)``.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    target = rand(m, d_t, scale=2.0)
    if op == "token-norm-only":
        x = rand(m, d_t).requires_grad_()

        def reference(a, t):
            return token_normalized_mse_reference(a, t)

        def ours(a, t):
            return leap_kernels.token_normalized_mse(a, t)

        inputs = (x, target)
        leaves = (x,)
    elif op in ("mse", "token-mse"):
        normalize = op == "token-mse"
        student = rand(m, d_s).requires_grad_()
        weight = rand(d_t, d_s, scale=d_s**-0.5).requires_grad_()
        bias = rand(d_t, scale=0.1).requires_grad_()

        def reference(s, w, b, t):
            return fused_feature_loss_reference(s, w, b, t, normalize=normalize)

        def ours(s, w, b, t):
            return leap_kernels.fused_feature_loss(s, w, b, t, normalize=normalize)

        inputs = (student, weight, bias, target)
        leaves = (student, weight, bias)
    else:
        raise ValueError(f"op: expected 'mse', 'token-mse' or 'token-norm-only', got {op!r}")

    def fwd_bwd(loss_fn):
        def run():
            loss = loss_fn(*inputs)
            torch.autograd.grad(loss, leaves)

        return run

    variants = {
        "eager": lambda: fwd_bwd(reference),
        "compile": lambda: fwd_bwd(torch.compile(reference, fullgraph=True, backend=compile_backend)),
        "ours": lambda: fwd_bwd(ours),
    }
    if op != "token-norm-only":
        s, w = inputs[0].detach(), inputs[1].detach()

        def gemm_floor():
            def run():
                p = s @ w.T
                p @ w
                p.T @ s

            return run

        variants["gemm-floor"] = gemm_floor
    return variants


# ----------------------------------------------------------------------------- teacher attention


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """One attention benchmark; ``rope``: DINOv3's rotary embedding (CLS + 4 storage tokens unrotated,
    ``n - 5`` patch tokens on a square grid), ours fused in the kernel, the SDPA variants with timm's
    separate rotation of q and k (``timm.models.eva.EvaAttention``)."""

    name: str
    batch: int
    heads: int
    n: int
    head_dim: int
    rope: bool = False


#: DINOv3 prefix tokens (CLS + 4 storage tokens): not rotated.
DINOV3_PREFIX = 5


def _dinov3_cases(batch: int) -> list[AttentionCase]:
    """DINOv3 attention at 224 px (N = 201) and 512 px (N = 1029) for ViT-S/16 (H = 6), ViT-L/16 (H = 16,
    d = 64) and ViT-7B/16 (H = 32, d = 128)."""
    return [
        AttentionCase(f"dinov3-rope-B{batch}-H{h}-N{n}-d{d}", batch, h, n, d, rope=True)
        for n in (201, 1029)
        for h, d in ((6, 64), (16, 64), (32, 128))
    ]


ATTENTION_CASES = {
    "full": [
        AttentionCase("vitg-reg4-224-B128-H24-N261-d64", 128, 24, 261, 64),
        AttentionCase("vits-224-B128-H6-N257-d64", 128, 6, 257, 64),
        AttentionCase("vitg-448-B32-H24-N1025-d64", 32, 24, 1025, 64),
        *_dinov3_cases(64),
    ],
    "small": [],  # GPU only: attention at CPU sizes says nothing about the kernels
    "smoke": [
        AttentionCase("smoke-B2-H2-N37-d64", 2, 2, 37, 64),
        AttentionCase("smoke-dinov3-rope-B2-H2-N21-d64", 2, 2, 21, 64, rope=True),
    ],
}


def dinov3_rope(n: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's DINOv3 rotary embedding of an ``n - 5`` token square grid as the op's ``(sin, cos)``
    tables, each ``(n - 5, d/2)`` (views of timm's ``(n - 5, 2d)`` embedding, as the teacher passes them)."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    from leap.vit import rope_tables

    side = int(round((n - DINOV3_PREFIX) ** 0.5))
    if side * side != n - DINOV3_PREFIX:
        raise ValueError(f"n - {DINOV3_PREFIX} must be a square patch grid, got n = {n}")
    emb = RotaryEmbeddingDinoV3(head_dim, temperature=100, feat_shape=[side, side], rotate_half=True).get_embed()
    return rope_tables(emb, head_dim)


def timm_rotate(t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], prefix: int = DINOV3_PREFIX) -> torch.Tensor:
    """What timm's ``EvaAttention`` does to q or k ``(B, H, N, d)`` before SDPA: rotate the patch tokens
    with ``apply_rot_embed_cat`` (half layout) and concatenate the prefix tokens back (new tensors)."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    sin, cos = rope
    emb = torch.cat([sin, sin, cos, cos], dim=-1)  # timm's (N - P, 2d) [sin | cos] half layout
    rotated = apply_rot_embed_cat(t[:, :, prefix:, :], emb, half=True)
    return torch.cat([t[:, :, :prefix, :], rotated], dim=2).type_as(t)


def attention_flops(batch: int, heads: int, n: int, d: int) -> float:
    """``4 B H N^2 d``: the two attention products."""
    return 4.0 * batch * heads * n * n * d


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }


def sdpa_context(name: str | None):
    """``sdpa_kernel`` forcing one SDPA backend ("cudnn", "flash", "efficient", "math"); None: no-op."""
    import contextlib

    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_sdpa_backends()[name]])


def attention_variants(
    qkv: torch.Tensor,
    heads: int,
    compile_backend: str = "inductor",
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Callable]:
    """name -> factory returning ``(fn, context)``: ``fn()`` computes the ``(B, N, H*d)`` output of
    attention on the packed ``qkv (B, N, 3*H*d)`` and is timed inside ``context`` (an SDPA backend
    selection, entered once around the timing). With ``rope`` (the DINOv3 tables, :func:`dinov3_rope`),
    ``ours`` rotates q and k inside the kernel, the ``sdpa-*`` variants rotate them first as timm does
    (:func:`timm_rotate`), and the ``eager``/``compile`` reference rotates them too; the prepermuted and
    xformers variants are not built.

    ``ours``: leap_kernels.teacher_attention; ``eager``: the plain PyTorch reference (matmul,
    softmax, matmul); ``compile``: torch.compile of it; ``sdpa-default`` / ``sdpa-<backend>``: what timm
    does (permuted views of the packed qkv -> SDPA -> transpose/reshape), with SDPA's own choice or
    one backend forced; ``sdpa-<backend>-prepermuted``: SDPA alone on contiguous q, k, v made
    beforehand (the kernel without the layout cost); ``xformers`` when importable.
    """
    import contextlib

    batch, n, c = qkv.shape
    d = c // (3 * heads)
    scale = d**-0.5
    none = contextlib.nullcontext
    if rope is not None:
        return _rope_attention_variants(qkv, heads, rope, compile_backend)

    def packed(backend):
        return lambda: (lambda: teacher_attention_torch(qkv, heads, scale), sdpa_context(backend))

    def prepermuted(backend):
        def make():
            q, k, v = (t.contiguous() for t in split_qkv(qkv, heads))
            return (lambda: F.scaled_dot_product_attention(q, k, v)), sdpa_context(backend)

        return make

    def xformers_variant():
        import xformers.ops as xops  # ImportError -> reported as this variant's error

        q, k, v = qkv.view(batch, n, 3, heads, d).unbind(2)  # (B, N, H, d) views
        return (lambda: xops.memory_efficient_attention(q, k, v).reshape(batch, n, heads * d)), none()

    def compiled():
        fn = torch.compile(teacher_attention_reference, fullgraph=True, backend=compile_backend)
        return (lambda: fn(qkv, heads)), none()

    variants = {
        "ours": lambda: ((lambda: leap_kernels.teacher_attention(qkv, heads)), none()),
        "eager": lambda: ((lambda: teacher_attention_reference(qkv, heads)), none()),
        "compile": compiled,
        "sdpa-default": packed(None),
        "xformers": xformers_variant,
    }
    for backend in ("cudnn", "flash", "efficient"):
        variants[f"sdpa-{backend}"] = packed(backend)
        variants[f"sdpa-{backend}-prepermuted"] = prepermuted(backend)
    return variants


def _rope_attention_variants(
    qkv: torch.Tensor, heads: int, rope: tuple[torch.Tensor, torch.Tensor], compile_backend: str
) -> dict[str, Callable]:
    import contextlib

    batch, n, c = qkv.shape
    none = contextlib.nullcontext
    sin, cos = rope

    def timm_path(backend):
        def run():
            q, k, v = split_qkv(qkv, heads)
            out = F.scaled_dot_product_attention(timm_rotate(q, rope), timm_rotate(k, rope), v)
            return out.transpose(1, 2).reshape(batch, n, c // 3)

        return lambda: (run, sdpa_context(backend))

    def reference(t, s, co):
        return teacher_attention_reference(t, heads, rope=(s, co), rope_prefix=DINOV3_PREFIX)

    def compiled():
        fn = torch.compile(reference, fullgraph=True, backend=compile_backend)
        return (lambda: fn(qkv, sin, cos)), none()

    variants = {
        "ours": lambda: (
            (lambda: leap_kernels.teacher_attention(qkv, heads, rope=rope, rope_prefix=DINOV3_PREFIX)),
            none(),
        ),
        "eager": lambda: ((lambda: reference(qkv, sin, cos)), none()),
        "compile": compiled,
        "sdpa-default": timm_path(None),
    }
    for backend in ("cudnn", "flash", "efficient"):
        variants[f"sdpa-{backend}"] = timm_path(backend)
    return variants


# ----------------------------------------------------------------------------- truncated teacher


TEACHER_MODEL = "vit_giant_patch14_reg4_dinov2"
STUDENT_MODEL = "vit_small_patch14_dinov2"


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Teacher and student of the teacher-forward and LEAP-step benchmarks at one size."""

    teacher: str
    student: str
    img_size: int
    batch: int
    teacher_overrides: dict
    student_overrides: dict
    teacher_ks: tuple[int, ...]
    step_ks: tuple[int, ...]


MODEL_SIZES = {
    "full": ModelSize(TEACHER_MODEL, STUDENT_MODEL, 224, 128, {}, {}, (40,), (10, 20, 40)),
    "small": ModelSize(TEACHER_MODEL, STUDENT_MODEL, 224, 128, {}, {}, (40,), (10, 20, 40)),  # GPU only
    "smoke": ModelSize(
        "vit_small_patch14_dinov2",
        "vit_small_patch14_dinov2",
        56,
        2,
        dict(depth=4, embed_dim=128, num_heads=2),
        dict(depth=2, embed_dim=64, num_heads=1),
        (1, 4),
        (1, 2, 4),
    ),
}


#: The DINOv3 truncated-teacher benchmark (bench_attention.py --teacher --model vit_7b_patch16_dinov3):
#: ViT-7B/16 at 224 px (N = 201), batch 64, k = 10, 20, 40; smoke: a 7B-shaped two-block toy.
DINOV3_SIZES = {
    "full": ModelSize("vit_7b_patch16_dinov3", "vit_small_patch16_dinov3", 224, 64, {}, {}, (10, 20, 40), (10, 20, 40)),
    "smoke": ModelSize(
        "vit_7b_patch16_dinov3",
        "vit_small_patch16_dinov3",
        48,
        2,
        dict(depth=2, embed_dim=128, num_heads=1, mlp_ratio=2, swiglu_align_to=8),
        dict(depth=1, embed_dim=64, num_heads=1),
        (1, 2),
        (1, 2),
    ),
}


def build_teacher(
    model_name: str, img_size: int, device: torch.device, overrides: dict, *, attention_kernel: bool | None = None
):
    """A :class:`leap.teacher.TruncatedTeacher` around a randomly initialised timm model (bf16 on
    CUDA, fp32 on CPU)."""
    from leap.models import build_model
    from leap.teacher import TruncatedTeacher

    with torch.device(device):  # random init directly on the device (fast for the 1.1B-param giant)
        model = build_model(model_name, img_size=img_size, **overrides)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return TruncatedTeacher(model, dtype=dtype, attention_kernel=attention_kernel)


def teacher_view(teacher, attention_kernel: bool | None):
    """A second :class:`~leap.teacher.TruncatedTeacher` over the same model (no copy), with its own
    ``attention_kernel`` setting: variants that differ only there share one set of weights, and a
    compiled variant never sees the setting change under it."""
    from leap.teacher import TruncatedTeacher

    return TruncatedTeacher(teacher.model, dtype=teacher.dtype, attention_kernel=attention_kernel)


def teacher_flops(teacher, batch: int, k: int) -> float:
    """GEMM + attention FLOPs of ``teacher(x, k)``: patch embed, k blocks (every nn.Linear), final norm ignored."""
    from torch import nn

    m = teacher.model
    tokens = m.patch_embed.num_patches + teacher.num_prefix_tokens
    proj = m.patch_embed.proj
    flops = 2.0 * m.patch_embed.num_patches * proj.weight.numel()
    for block in list(m.blocks)[:k]:
        for layer in block.modules():
            if isinstance(layer, nn.Linear):
                flops += 2.0 * tokens * layer.weight.numel()
        flops += 4.0 * tokens * tokens * block.attn.num_heads * block.attn.head_dim
    return batch * flops


def regional_compiled_teacher(teacher, compile_backend: str = "inductor") -> Callable:
    """``forward(images, k) -> (patch (B, N, D), cls (B, D))``: timm's own forward to block ``k``
    with each block under ``torch.compile`` (regional compilation).

    The blocks share one class and one set of shapes, so the compiled code of the first block
    serves all of them (parameters are graph inputs): the cold compile costs one block, seconds,
    not one graph per depth ``k``, minutes for a ViT-g. Patch embed, positions and the final norm
    stay eager (they run once per forward). The same computation as ``TruncatedTeacher(x, k)``
    with timm's attention.
    """
    from leap import vit

    model = teacher.model
    family = vit.family_of(model)
    blocks = [torch.compile(block, dynamic=False, backend=compile_backend) for block in family.blocks(model)]
    prefix = teacher.num_prefix_tokens

    @torch.no_grad()
    def forward(images: torch.Tensor, k: int):
        x, pos = family.embed_with_pos(model, images.to(teacher.dtype))  # (tokens, rope): DINOv3's blocks take rope
        for i, block in enumerate(blocks[:k]):
            x = block(x, **family.block_kwargs(model, i, pos))
        x = family.final_norm(model, x)
        return x[:, prefix:], x[:, 0]

    return forward


def teacher_variants(teacher, x: torch.Tensor, k: int, compile_backend: str = "inductor") -> dict[str, Factory]:
    """One forward of the truncated teacher to block ``k`` on images ``x (B, 3, H, W)``.

    ``timm``: timm's own blocks (SDPA attention); ``timm-compile``: the same forward with each block
    compiled (:func:`regional_compiled_teacher`); ``ours``: the blocks with
    leap_kernels.teacher_attention (wrap with :func:`forced` for one attention backend).
    """
    stock = teacher_view(teacher, False)
    kernel = teacher_view(teacher, True)

    def compiled():
        fn = regional_compiled_teacher(stock, compile_backend)
        return lambda: fn(x, k)

    return {"timm": lambda: lambda: stock(x, k), "timm-compile": compiled, "ours": lambda: lambda: kernel(x, k)}


# ----------------------------------------------------------------------------- one LEAP step


class LeapStep:
    """One LEAP training step at target block ``k``, built once per variant and called with ``k``.

    ``ours`` is the trainer's step (as :func:`leap.run.timing.measure_step_times` runs it): the truncated
    teacher with the attention kernel, :class:`leap.objective.DistillModule` (student + head +
    ``leap_kernels.fused_feature_loss``, patch loss + 0.05 x CLS loss), backward, the per-step CKA
    on the re-projected student and a fused AdamW step.

    ``stock-eager`` / ``stock-compile`` is the same step with stock tools: timm's blocks for the
    teacher, ``nn.Linear`` head + ``F.mse_loss`` for the loss (same CLS weight), the same CKA
    (``leap.cka.linear_cka``, plain PyTorch) and optimizer; ``stock-compile`` compiles the teacher's
    blocks (:func:`regional_compiled_teacher`) and the student forward + loss (its backward through
    AOTAutograd). Student forward under autocast to the teacher dtype on CUDA.
    """

    VARIANTS = ("ours", "stock-eager", "stock-compile")

    def __init__(
        self,
        variant: str,
        teacher,
        student_template: torch.nn.Module,
        batch: int,
        device: torch.device,
        compile_backend: str = "inductor",
        cls_weight: float = 0.05,
    ):
        from leap.cka import linear_cka
        from leap.cost import pair
        from leap.objective import DistillModule

        if variant not in self.VARIANTS:
            raise ValueError(f"variant: expected one of {self.VARIANTS}, got {variant!r}")
        device = torch.device(device)
        self.variant = variant
        cuda = device.type == "cuda"
        dtype = teacher.dtype
        amp = dtype in (torch.bfloat16, torch.float16)
        student = copy.deepcopy(student_template).to(device).train()
        d_s, d_t = int(student.embed_dim), teacher.embed_dim
        prefix = int(student.num_prefix_tokens)
        h, w = pair(teacher.model.patch_embed.img_size)
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.randn(batch, 3, h, w, generator=gen).to(device)
        opt_kwargs = {"fused": True} if cuda else {"foreach": True}

        if variant == "ours":
            kernel_teacher = teacher_view(teacher, True if cuda else None)
            head = leap_kernels.FeatureDistillationHead(d_s, d_t)
            module = DistillModule(student, head, cls_weight, compute_dtype=dtype if amp else None).to(device).train()
            opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6, **opt_kwargs)

            def step(k: int) -> None:
                t_patch, t_cls = kernel_teacher(self.x, k)
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    loss, _, _, s_patch = module(self.x, t_patch, t_cls)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    linear_cka(module.head.project(s_patch), t_patch)
                opt.step()
        else:
            stock_teacher = teacher_view(teacher, False)
            head = torch.nn.Linear(d_s, d_t).to(device)
            opt = torch.optim.AdamW(list(student.parameters()) + list(head.parameters()), lr=1e-6, **opt_kwargs)

            def teacher_forward(images, k):
                return stock_teacher(images, k)

            def student_loss(images, t_patch, t_cls):
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    feats = student.forward_features(images)
                    s_patch, s_cls = feats[:, prefix:], feats[:, 0]
                    patch_loss = F.mse_loss(head(s_patch).float(), t_patch.float())
                    cls_loss = F.mse_loss(head(s_cls).float(), t_cls.float())
                return patch_loss + cls_weight * cls_loss, s_patch.detach()

            if variant == "stock-compile":
                student_loss = torch.compile(student_loss, backend=compile_backend)
                # Regional compilation: one compiled block serves every block and every k.
                teacher_forward = regional_compiled_teacher(stock_teacher, compile_backend)

            def step(k: int) -> None:
                t_patch, t_cls = teacher_forward(self.x, k)
                loss, s_patch = student_loss(self.x, t_patch, t_cls)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    linear_cka(F.linear(s_patch, head.weight.to(s_patch.dtype), head.bias.to(s_patch.dtype)), t_patch)
                opt.step()

        self.step = step

    def at(self, k: int) -> Callable[[], None]:
        """The no-argument closure of one step at block ``k`` (what a timed round calls)."""
        return lambda: self.step(k)


def build_student(model_name: str, img_size: int, device: torch.device, overrides: dict):
    """A randomly initialised timm student (fp32 weights; the step autocasts)."""
    from leap.models import build_model

    with torch.device(device):
        return build_model(model_name, img_size=img_size, **overrides)
