"""Named parameter sets for the optimizer benchmark (shapes only; values are random).

Each set is a list of parameter shapes as a model of that architecture would hand to an
optimizer (tied weights counted once, biases and norm weights included).
"""

from __future__ import annotations

__all__ = ["PARAM_SETS", "param_shapes", "describe"]

Shape = tuple[int, ...]


def gpt2_124m() -> list[Shape]:
    """GPT-2 small (124M): token and position embeddings (lm head tied), 12 blocks, final LN."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,), (d,),                # ln_1 weight, bias
            (3 * d, d), (3 * d,),      # attention qkv
            (d, d), (d,),              # attention output projection
            (d,), (d,),                # ln_2
            (4 * d, d), (4 * d,),      # mlp fc
            (d, 4 * d), (d,),          # mlp projection
        ]
    shapes += [(d,), (d,)]             # ln_f
    return shapes


def vit_b16() -> list[Shape]:
    """ViT-B/16 at 224x224 with a 1000-class head (86.6M): a 4-D patch-embedding conv."""
    d, layers, patches, classes = 768, 12, 196, 1000
    shapes: list[Shape] = [(d, 3, 16, 16), (d,), (1, 1, d), (1, patches + 1, d)]
    for _ in range(layers):
        shapes += [
            (d,), (d,),
            (3 * d, d), (3 * d,),
            (d, d), (d,),
            (d,), (d,),
            (4 * d, d), (4 * d,),
            (d, 4 * d), (d,),
        ]
    shapes += [(d,), (d,), (classes, d), (classes,)]
    return shapes


def big_matrix() -> list[Shape]:
    """One 8192 x 4096 matrix (33.5M): a single large tensor, no per-tensor overhead."""
    return [(8192, 4096)]


def tiny() -> list[Shape]:
    """A small mixed set for CI and smoke tests (0-d to 4-d, ~0.2M parameters)."""
    return [(), (64,), (256, 128), (128, 512), (4, 32, 48), (16, 8, 3, 3), (512,), (300, 200)]


PARAM_SETS = {
    "gpt2-124m": gpt2_124m,
    "vit-b16": vit_b16,
    "big-matrix": big_matrix,
    "tiny": tiny,
}


def param_shapes(name: str) -> list[Shape]:
    """The shapes of the named set (see :data:`PARAM_SETS`)."""
    try:
        return PARAM_SETS[name]()
    except KeyError:
        raise ValueError(f"unknown parameter set {name!r}; known: {sorted(PARAM_SETS)}") from None


def describe(shapes: list[Shape]) -> dict[str, int]:
    """Counts of a shape list: tensors, parameters, and how many are matrices (ndim >= 2)."""
    numel = [_numel(s) for s in shapes]
    return {
        "tensors": len(shapes),
        "parameters": sum(numel),
        "matrix_tensors": sum(len(s) >= 2 for s in shapes),
        "matrix_parameters": sum(n for n, s in zip(numel, shapes, strict=True) if len(s) >= 2),
    }


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
