"""Attention-entropy scaling for sizes a model was not trained at (Jin et al., NeurIPS 2023, arXiv 2306.08645).

The entropy of a softmax over N keys grows with log N, so a model run on more tokens than it was trained on spreads
its attention thinner (repeated, disordered content), and on fewer tokens concentrates it (incomplete objects). The
paper (§3.2) replaces the logit scale 1/sqrt(d) by sqrt(log_T N / d), N the keys of a self-attention layer and T
the same layer's key count at the training size: the
logits are multiplied by sqrt(log N / log T), which keeps the entropy about where training left it. Training-free;
it changes one number per attention call, so it composes with every other method (``base``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from ..context import AttentionContext
from .base import SELF_AND_JOINT, AttentionMethod
from .checks import check_int, check_number, check_roles_arg
from .dense import Dense

__all__ = ["EntropyScaling", "entropy_scale"]


def entropy_scale(tokens: int, train_tokens: int) -> float:
    """The logit multiplier sqrt(log_T N) = sqrt(log N / log T) for ``tokens`` keys at a trained count of
    ``train_tokens``."""
    if tokens < 1 or train_tokens < 2:
        raise ValueError(f"entropy_scale: need tokens >= 1 and train_tokens >= 2, got {tokens} and {train_tokens}")
    return math.sqrt(math.log(tokens) / math.log(train_tokens)) if tokens > 1 else 1.0


@dataclass(frozen=True)
class EntropyScaling(AttentionMethod):
    """Multiply the attention logits by sqrt(log N / log T), N = the keys of the call, then run ``base``.

    T, the keys the layer saw at the training size, is given one of two ways: ``train_tokens`` (for a DiT, where
    every layer sees the same tokens: frames x rows x columns of the patch grid at the trained size, plus the text
    tokens of a joint-attention model) or ``token_ratio``, the size's token count over the trained one (for a UNet,
    whose levels see different counts: T = N / ratio in each layer; 4.0 for twice the trained height and width). Scaling
    the queries scales every logit, so any ``base`` (dense, a static or dynamic sparse method, token downsampling)
    sees the rescaled attention; a dynamic method's block selection sees it too. At the trained size the factor is
    exactly 1. Cross-attention is left alone by default: its key count (the text) does not change with the size.
    """

    train_tokens: int | None = None
    base: AttentionMethod = field(default_factory=Dense)
    token_ratio: float | None = None
    roles: frozenset[str] = field(default=SELF_AND_JOINT)

    def __post_init__(self) -> None:
        if (self.train_tokens is None) == (self.token_ratio is None):
            raise ValueError(
                "EntropyScaling: give train_tokens (the key count at the training size, for a DiT) or "
                "token_ratio (this size's tokens over the trained ones, for a UNet), exactly one"
            )
        if self.train_tokens is not None:
            check_int(
                "EntropyScaling",
                "train_tokens",
                self.train_tokens,
                minimum=2,
                example=4096,
                meaning="the key count at the training size (for a video DiT frames x rows x columns of its patches)",
            )
        if self.token_ratio is not None:
            ratio = check_number(
                "EntropyScaling",
                "token_ratio",
                self.token_ratio,
                low=0.0,
                low_open=True,
                example=4.0,
                meaning="this size's tokens over the trained ones (4.0 for twice the trained height and width)",
            )
            object.__setattr__(self, "token_ratio", ratio)
        if not isinstance(self.base, AttentionMethod) or isinstance(self.base, EntropyScaling):
            raise TypeError(
                f"EntropyScaling: base must be another attention method (Dense, SlidingTileAttention, ...), "
                f"got {type(self.base).__name__}"
            )
        if self.base.stack_level != self.stack_level:
            raise TypeError(
                f"{self.name}: base {self.base.name} is not a kernel-level method; apply it separately "
                "(diffattn.apply stacks guidance and editing methods around this one)"
            )
        roles = check_roles_arg(self.roles, self.name)
        if "cross" in roles and "cross" not in self.base.roles:
            raise ValueError(
                f"{self.name}: roles include 'cross', but base {self.base.name} does not act on cross-attention "
                f"(its roles are {sorted(self.base.roles)}); leave 'cross' out of roles (the default), or use a base "
                "that takes it (Dense, Masked)"
            )
        object.__setattr__(self, "roles", roles)

    @property
    def name(self) -> str:
        return "EntropyScaling" if isinstance(self.base, Dense) else f"EntropyScaling({self.base.name})"

    def validate(self, ctx: AttentionContext) -> None:
        self.base.validate(ctx)

    def factor(self, ctx: AttentionContext, keys: int) -> float:
        """The logit multiplier for a call with ``keys`` keys (the whole sequence's count under context parallelism)."""
        keys = max(keys, ctx.kv_layout.num_tokens)
        trained = self.train_tokens if self.train_tokens is not None else max(2, round(keys / self.token_ratio))
        return entropy_scale(keys, trained)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        factor = self.factor(ctx, k.shape[-2])
        ctx.report(entropy_scale=factor)
        return self.base(q * factor if factor != 1.0 else q, k, v, ctx)
