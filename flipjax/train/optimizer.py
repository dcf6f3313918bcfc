"""AdamW with warmup + cosine decay, gradient clipping, a weight-decay mask, and regex rules
(big_vision style) that freeze parameter groups or scale their learning rate.

Parameters stay float32 (the master weights) whatever `config.model.dtype` computes in;
`optim.mu_dtype="bfloat16"` stores Adam's first moment in bf16, as big_vision's SigLIP runs do,
saving a quarter of the optimizer state (a sixth of params + state). The second moment stays
float32: with b2 near 1 its per-step change is below bf16's 8-bit mantissa and would be lost.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax

from flipjax.train.tree_names import leaf_names

FROZEN = "frozen"


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.end_lr_fraction)


def param_groups(params: Any, cfg: ml_collections.ConfigDict) -> Any:
    """Labels each parameter: 'frozen', 'lr_mult_<i>' (first matching rule) or 'default'.

    Rules match whole parameter names as `leaf_names` writes them, e.g. `img/.*` or
    `txt/encoder/.*`. A rule that labels no parameter is an error: a misspelt freeze would
    otherwise train the tower it was meant to keep.
    """
    frozen = re.compile(cfg.frozen_regex) if cfg.frozen_regex else None
    mults = [(re.compile(pattern), i) for i, (pattern, _) in enumerate(cfg.lr_mults)]

    def label(name: str) -> str:
        if frozen is not None and frozen.fullmatch(name):
            return FROZEN
        return next((f"lr_mult_{i}" for rx, i in mults if rx.fullmatch(name)), "default")

    names = leaf_names(params)
    labels = jax.tree.map(label, names)
    used = set(jax.tree.leaves(labels))
    rules = {FROZEN: f"config.optim.frozen_regex={cfg.frozen_regex!r}"} if frozen else {}
    rules.update({f"lr_mult_{i}": f"config.optim.lr_mults[{i}]={pattern!r}"
                  for i, (pattern, _) in enumerate(cfg.lr_mults)})
    unused = [rule for group, rule in rules.items() if group not in used]
    if unused:
        raise ValueError(f"{', '.join(unused)} matches no parameter (or only ones an "
                         f"earlier rule took). {_whole_names(names)}; e.g. 'img/.*' for the "
                         "image tower")
    return labels


def _whole_names(names: Any) -> str:
    return f"Rules match whole names such as {', '.join(jax.tree.leaves(names)[:4])}"


def decay_mask(params: Any, cfg: ml_collections.ConfigDict) -> Any:
    """Whether each parameter gets weight decay: `optim.decay_regex` matches its whole name."""
    decay_rx = re.compile(cfg.decay_regex)
    return jax.tree.map(lambda name: bool(decay_rx.fullmatch(name)), leaf_names(params))


def check_decay_regex(params: Any, cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError when `weight_decay` is above 0 and `decay_regex` matches no
    parameter: written as a search (`kernel$`, as sharding rules are) it would decay nothing,
    silently. Checked by `validate` before training; a run saved before still restores."""
    if cfg.weight_decay and not any(jax.tree.leaves(decay_mask(params, cfg))):
        raise ValueError(f"config.optim.decay_regex: {cfg.decay_regex!r} matches no parameter, "
                         f"so config.optim.weight_decay={cfg.weight_decay} decays nothing. "
                         f"{_whole_names(leaf_names(params))}; e.g. '.*/kernel'")


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for `params` (a pure dict) and the base learning-rate schedule."""
    schedule = make_schedule(cfg, total_steps)
    labels = param_groups(params, cfg)
    decayed = decay_mask(params, cfg)

    def adamw(mult: float) -> optax.GradientTransformation:
        lr = schedule if mult == 1.0 else (lambda step: mult * schedule(step))
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decayed, mu_dtype=cfg.mu_dtype)

    groups = {FROZEN: optax.set_to_zero(), "default": adamw(1.0)}
    groups.update({f"lr_mult_{i}": adamw(float(m)) for i, (_, m) in enumerate(cfg.lr_mults)})
    # Frozen gradients are zeroed before clipping so that they don't shrink the others. (The
    # train step's are zeros already, frozen leaves entering its loss as constants; this keeps
    # the optimizer right for any gradients, and its state as existing checkpoints hold it.)
    zero_frozen = optax.multi_transform(
        {g: optax.set_to_zero() if g == FROZEN else optax.identity() for g in groups}, labels)
    chain = [zero_frozen]
    if cfg.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain.append(optax.multi_transform(groups, labels))
    return optax.chain(*chain), schedule
