"""The seed models, in loop form and scan form, as ``verify`` targets.

Two notebooks (``seeds/seed-0-scan-basics``, ``seeds/seed-1-pyloop-to-scan``)
define the models ckptconv was built for. They ship here so that
``ckptconv verify --block ckptconv.models:AttentionDenseBlock`` and
``ckptconv verify --model ckptconv.models:causal_lm`` work out of the box.

Blocks (one layer each, called as ``block(x)``, returning ``(x, out)``):

* `AttentionDenseBlock`: seed-0's block, ``x += attention(x); x += dense(x)``.
  Params per layer: ``Dense_0/{bias,kernel}``,
  ``self_attention/{key,out,query,value}/{bias,kernel}``.
* `NormAttentionBlock`: seed-1's block, ``RMSNorm_0 -> self_attention (+x) ->
  RMSNorm_1 -> Dense_0 (+x)``. Params per layer: ``Dense_0/{bias,kernel}``,
  ``RMSNorm_0/scale``, ``RMSNorm_1/scale``,
  ``self_attention/{key,out,query,value}/{bias,kernel}``.

Wrappers that build N layers around any such block:

* `LoopModel`: a Python loop; layer ``i`` is the submodule
  ``pattern.format(i=i)`` (default ``layer_{i}``).
* `ScanModel`: ``nn.scan``; every variable of every layer lives under
  ``<into>`` (default ``blocks``) with the layer axis at ``axis`` (default 0),
  with no extra naming level: ``params/blocks/Dense_0/kernel``.

Stacking the loop params (``np.stack([lp["layer_0"], ...], axis)``, leaf by
leaf, under ``blocks``) gives params for which `ScanModel` computes the same
outputs as `LoopModel`, to float32 rounding. Measured on CPU (jax 0.10.2), max
|loop - scan| over outputs and all intermediates: float32 0.0 (seed0) and
1.2e-6 (seed1), for axis 0 and 1; CausalLM logits 2.4e-7. In bfloat16 up to a
few bf16 ulps (0.2 on values ~17): XLA's excess-precision rewrite skips some
bf16 roundings and does so differently in the unrolled loop and in the scan
body; ``XLA_FLAGS=--xla_allow_excess_precision=false`` makes them equal.

Intermediates: with ``out, state = m.apply(variables, *inputs,
capture_intermediates=True, mutable=True)``, ``state["intermediates"]`` is a
nested dict whose leaves are tuples (one entry per call; flax's ``sow``):

* `LoopModel` (N layers, default pattern)::

      {"__call__": (x_final,),
       "layer_0": {"__call__": ((x, out),),          # the block's return
                   "Dense_0": {"__call__": (y,)},
                   "self_attention": {"__call__": (y,),
                                      "query": {"__call__": (y,)}, ...},
                   "RMSNorm_0": {"__call__": (y,)}, ...},   # NormAttentionBlock
       ...
       "layer_{N-1}": {...}}

* `ScanModel`: the same tree with the ``layer_i`` keys replaced by one key
  ``<into>`` (default ``blocks``), and every array inside carrying a leading
  layer axis of length N (axis 0, whatever ``axis`` the params use)::

      {"__call__": (x_final,),
       "blocks": {"__call__": ((x[N, ...], out{k: [N, ...]}),),
                  "Dense_0": {"__call__": (y[N, ...],)}, ...}}

  So ``loop["layer_i"][path]["__call__"][c]`` corresponds to
  ``scan["blocks"][path]["__call__"][c][i]`` for every path and call index c.

* `CausalLM` (seed-1's KV-cache LM): one ``apply`` runs the prefill and then
  ``decode_steps`` greedy steps, so every per-layer entry is a tuple of
  ``1 + decode_steps`` calls: entry 0 is the prefill (sequence length
  ``prompt_len``), entry s the decode step s (sequence length 1). Loop form
  (``scan=False``)::

      {"__call__": ((logits, generated),),
       "embed": {"__call__": (e_prefill, e_1, ..., e_S)},
       "layer_i": {"__call__": (x_prefill, x_1, ..., x_S),
                   "self_attention": {"__call__": (...),
                                      "query"|"key"|"value"|"out":
                                          {"__call__": (...)}},
                   "mlp": {"__call__": (...),
                           "Dense_0": {"__call__": (...)},
                           "Dense_1": {"__call__": (...)}}},
       "lm_head": {"__call__": (...)},
       "step_logits": (l_0, ..., l_S),      # (B, vocab) float32 each
       "step_tokens": (t_1, ..., t_S)}      # (B,) int32 each

  Scan form (``scan=True``): ``layer_i`` replaced by ``blocks``, every array
  under it stacked on a leading layer axis (axis 0). The ``cache`` collection
  is ``cache/layer_i/self_attention/{cache_index,cached_key,cached_value}``
  (loop) or ``cache/blocks/self_attention/...`` stacked on axis 0 (scan).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AttentionDenseBlock",
    "CausalBlock",
    "CausalLM",
    "CausalSelfAttention",
    "LoopModel",
    "MLP",
    "NormAttentionBlock",
    "ScanModel",
    "causal_lm",
    "init_loop_params",
    "replace_submodule",
    "resolve_block",
    "scan_blocks",
    "seed0",
    "seed1",
]


# ---------------------------------------------------------------------------
# The seed blocks
# ---------------------------------------------------------------------------


def _dtype(dtype: Any) -> Any:
    """``"bfloat16"`` (from JSON on a command line) or ``jnp.bfloat16`` to a dtype.

    ``None`` stays ``None``: flax reads it as "infer from the inputs".
    """
    return None if dtype is None else jnp.dtype(dtype)


def _self_attention(num_heads: int, dtype: Any) -> nn.Module:
    """The seeds' ``nn.SelfAttention(name="self_attention", ...)``.

    ``MultiHeadDotProductAttention`` called on one input is exactly what
    ``SelfAttention`` does (same params: query/key/value/out), without
    ``SelfAttention``'s DeprecationWarning and without the second
    ``__call__`` entry its ``super().__call__`` would add to the captured
    intermediates.
    """
    return nn.MultiHeadDotProductAttention(
        num_heads=num_heads,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros,
        dtype=_dtype(dtype),
        name="self_attention",
    )


class AttentionDenseBlock(nn.Module):
    """Seed-0's ``SimpleBlock``: self-attention and a dense layer, residual.

    Attributes:
        hidden_dim: width of the input and of ``Dense_0``.
        num_heads: attention heads (``hidden_dim`` must divide evenly).
        dtype: computation dtype of the attention (params stay float32).
    """

    hidden_dim: int = 32
    num_heads: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Applies the block.

        Args:
            x: ``(batch, seq, hidden_dim)`` hidden states.
            attention_mask: optional boolean mask, broadcastable to
                ``(batch, heads, seq, seq)``.

        Returns:
            ``(x, out)``: the new hidden states and the seed's dict of
            intermediate values (``input_hidden_state``, ``+self_attention``,
            ``+dense``).
        """
        out = {"input_hidden_state": x}
        x += _self_attention(self.num_heads, self.dtype)(x, mask=attention_mask)
        out["+self_attention"] = x
        # No dtype, as in the seed: Dense computes in the promoted dtype.
        x += nn.Dense(features=self.hidden_dim)(x)
        out["+dense"] = x
        return x, out


class NormAttentionBlock(nn.Module):
    """Seed-1's ``SimpleBlock``: RMSNorm, attention, RMSNorm, dense.

    The residuals are taken after each norm, as in the seed (``x = norm(x);
    x += attention(x)``), not around it.

    Attributes:
        hidden_dim: width of the input and of ``Dense_0``.
        num_heads: attention heads (``hidden_dim`` must divide evenly).
        dtype: computation dtype of the norms and the attention.
    """

    hidden_dim: int = 32
    num_heads: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Applies the block.

        Args:
            x: ``(batch, seq, hidden_dim)`` hidden states.
            attention_mask: optional boolean mask, broadcastable to
                ``(batch, heads, seq, seq)``.

        Returns:
            ``(x, out)``: the new hidden states and the seed's dict of
            intermediate values (``input_hidden_state``, ``pre_attention_norm``,
            ``+self_attention``, ``pre_ffw_norm``, ``+dense``).
        """
        out = {"input_hidden_state": x}
        x = out["pre_attention_norm"] = nn.RMSNorm(dtype=_dtype(self.dtype))(x)
        x += _self_attention(self.num_heads, self.dtype)(x, mask=attention_mask)
        out["+self_attention"] = x
        x = out["pre_ffw_norm"] = nn.RMSNorm(dtype=_dtype(self.dtype))(x)
        x += nn.Dense(features=self.hidden_dim)(x)
        out["+dense"] = x
        return x, out


# ---------------------------------------------------------------------------
# Loop and scan wrappers
# ---------------------------------------------------------------------------


def _first(y: Any) -> Any:
    """The hidden state of a block's return value: ``x`` or ``(x, ...)``."""
    return y[0] if isinstance(y, tuple) else y


def _module_fields(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a module instance, less parent and name."""
    return {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(module)
        if f.init and f.name not in ("parent", "name")
    }


def resolve_block(
    block: Any, block_kwargs: Mapping[str, Any] | None = None
) -> tuple[type[nn.Module], dict[str, Any]]:
    """Turns a ``--block`` target into a module class and its kwargs.

    Args:
        block: a linen Module class, a ``functools.partial`` of one, a module
            instance (its fields become kwargs), or a zero-argument callable
            returning any of those.
        block_kwargs: keyword arguments for the class; they override those
            taken from a partial or an instance.

    Returns:
        ``(cls, kwargs)`` such that ``cls(name=..., **kwargs)`` is one layer.

    Raises:
        TypeError: ``block`` is none of the above.
    """
    kwargs = dict(block_kwargs or {})
    # A callable is called at most once: what it returns must be a block.
    for attempt in range(2):
        if isinstance(block, type) and issubclass(block, nn.Module):
            return block, kwargs
        if isinstance(block, functools.partial):
            if block.args:
                raise TypeError(f"block {block!r}: a partial may bind keyword arguments only")
            cls, inner = resolve_block(block.func)
            return cls, {**inner, **block.keywords, **kwargs}
        if isinstance(block, nn.Module):
            return type(block), {**_module_fields(block), **kwargs}
        if attempt == 0 and callable(block):
            block = block()
            continue
        break
    raise TypeError(
        f"block {block!r} is not a flax.linen Module class, nor a function returning one"
    )


@functools.cache
def _scan_body(block_cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``block_cls`` that meets ``nn.scan``'s ``(carry, ys)`` contract.

    Subclassing (rather than wrapping the block in a parent module) is what
    keeps the params at ``<into>/Dense_0`` instead of
    ``<into>/Wrapper/Dense_0``. The adapter is ``nn.nowrap`` so that flax
    does not treat it as a module method of its own: the wrapped
    ``block_cls.__call__`` it calls still sets up the compact scope and sows
    the block's own return value, so ``capture_intermediates`` sees
    ``<into>/__call__`` exactly once per call, holding what the block
    returned (stacked), as ``layer_i/__call__`` does in the loop form.
    """

    def __call__(self, x, *args):  # noqa: N807 - it is the dunder it replaces
        return _first(block_cls.__call__(self, x, *args)), None

    return type(
        block_cls.__name__,
        (block_cls,),
        {
            "__call__": nn.nowrap(__call__),
            "__module__": block_cls.__module__,
            "__qualname__": block_cls.__qualname__,
        },
    )


def scan_blocks(
    block_cls: type[nn.Module], num_layers: int, axis: int = 0
) -> Callable[..., nn.Module]:
    """The ``nn.scan`` of a block class, N layers stacked on ``axis``.

    Instantiate the result with the block's kwargs and a name; calling it as
    ``m(x, *args)`` returns ``(x, None)``. Extra positional args are
    broadcast to every layer (they may be Python values, e.g. a mode string).

    Args:
        block_cls: the block, returning ``x`` or a tuple whose first item is
            ``x``.
        num_layers: N, the length of the layer axis.
        axis: where the layer axis goes in params, cache and batch_stats.

    Returns:
        The scanned module class.
    """
    return nn.scan(
        _scan_body(block_cls),
        variable_axes={
            "params": axis,
            "cache": axis,
            "batch_stats": axis,
            # Everything else (intermediates, other sow collections) on axis 0:
            # sown values may be scalars, which have no axis 1 to stack on.
            True: 0,
        },
        # Distinct params per layer; dropout masks differ per layer, as in a
        # loop where each layer gets its own rng stream.
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=num_layers,
        # Boxed (nn.Partitioned) params get the layer axis named, as MaxText
        # expects; plain arrays are unaffected.
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def replace_submodule(
    module_cls: type[nn.Module], name: str, make: Callable[[nn.Module], nn.Module]
) -> type[nn.Module]:
    """A subclass of ``module_cls`` whose ``setup`` builds ``make(original)``
    where ``module_cls.setup`` assigns ``self.<name> = original``.

    The way to a scan form of a model you did not write: Hugging Face's
    ``FlaxGPT2Module.setup`` makes ``self.h = FlaxGPT2BlockCollection(...)``
    (children ``0 … N-1``); ``replace_submodule(FlaxGPT2Module, "h", lambda
    old: ScanH(old.config, dtype=old.dtype))`` is the same module with a scanned
    ``h`` (params ``h/<block params>`` stacked, as ``to-scan`` stacks the
    digit-keyed list in place), everything else (names, call, defaults) its own.

    Args:
        module_cls: a Linen module class that assigns ``self.<name>`` in ``setup``.
        name: the attribute.
        make: gets the module ``setup`` built (unbound: read its fields) and
            returns the one to use instead; it gets the same name.

    Returns:
        The subclass (same ``__name__``).
    """

    def __setattr__(self, key, value):  # noqa: N807 - it is the dunder it extends
        if key == name and isinstance(value, nn.Module) and self._state.in_setup:
            value = make(value)
        module_cls.__setattr__(self, key, value)

    return type(
        module_cls.__name__,
        (module_cls,),
        {"__setattr__": __setattr__, "__module__": module_cls.__module__,
         "__qualname__": module_cls.__qualname__},
    )


class LoopModel(nn.Module):
    """N copies of a block, chained in a Python loop.

    Attributes:
        block: the block (see `resolve_block`).
        num_layers: N.
        block_kwargs: keyword arguments for every layer.
        pattern: name of layer ``i``, a ``str.format`` template with ``{i}``.
    """

    block: Any
    num_layers: int
    block_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pattern: str = "layer_{i}"

    def __post_init__(self) -> None:
        # A FrozenDict keeps the module hashable (jit caches, functools.cache).
        object.__setattr__(self, "block_kwargs", flax.core.FrozenDict(self.block_kwargs))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *args: Any) -> jax.Array:
        """Runs the layers in order.

        Args:
            x: the first layer's input.
            *args: passed unchanged to every layer.

        Returns:
            The last layer's hidden state.
        """
        cls, kwargs = resolve_block(self.block, self.block_kwargs)
        for i in range(self.num_layers):
            x = _first(cls(name=self.pattern.format(i=i), **kwargs)(x, *args))
        return x


class ScanModel(nn.Module):
    """N copies of a block under ``nn.scan``, variables stacked under ``into``.

    Attributes:
        block: the block (see `resolve_block`).
        num_layers: N.
        block_kwargs: keyword arguments for every layer.
        into: key of the stacked subtree (``params/<into>/...``).
        axis: position of the layer axis in params, cache and batch_stats
            (MaxText uses 1). Captured intermediates are stacked on axis 0.
    """

    block: Any
    num_layers: int
    block_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    into: str = "blocks"
    axis: int = 0

    def __post_init__(self) -> None:
        # A FrozenDict keeps the module hashable (jit caches, functools.cache).
        object.__setattr__(self, "block_kwargs", flax.core.FrozenDict(self.block_kwargs))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *args: Any) -> jax.Array:
        """Runs the scanned layers.

        Args:
            x: the first layer's input (the scan carry: each layer must
                return a hidden state of the same shape and dtype).
            *args: broadcast unchanged to every layer.

        Returns:
            The last layer's hidden state.
        """
        cls, kwargs = resolve_block(self.block, self.block_kwargs)
        layers = scan_blocks(cls, self.num_layers, self.axis)
        x, _ = layers(name=self.into, **kwargs)(x, *args)
        return x


# ---------------------------------------------------------------------------
# Seed-1's causal LM with a KV cache
# ---------------------------------------------------------------------------

_MODES = ("full", "prefill", "decode")


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with an optional KV cache.

    Modes: ``"full"`` attends over the input alone (no cache); ``"prefill"``
    starts a fresh cache with the input's keys and values; ``"decode"``
    appends to the cache and attends over everything cached so far. The cache
    (``cached_key``, ``cached_value``: ``(batch, max_len, heads, head_dim)``;
    ``cache_index``: int32 scalar) is created on the first cached call.

    Attributes:
        num_heads: attention heads.
        max_len: cache length: prompt length plus decode steps at most.
        dtype: computation dtype.
    """

    num_heads: int = 4
    max_len: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mode: str = "full") -> jax.Array:
        """Applies the attention.

        Args:
            x: ``(batch, seq, features)``.
            mode: ``"full"``, ``"prefill"`` or ``"decode"``.

        Returns:
            ``(batch, seq, features)``.

        Raises:
            ValueError: unknown mode.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        dtype = _dtype(self.dtype)
        batch, length, features = x.shape
        head_dim = features // self.num_heads
        heads = (batch, length, self.num_heads, head_dim)

        def project(name: str) -> jax.Array:
            return nn.Dense(features, dtype=dtype, name=name)(x).reshape(heads)

        query, key, value = project("query"), project("key"), project("value")
        q_pos = jnp.arange(length)
        if mode == "full":
            k_pos = jnp.arange(length)
        else:
            shape = (batch, self.max_len, self.num_heads, head_dim)
            cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
            index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
            if mode == "prefill":
                # Start from zeros, not from whatever cache came in with the
                # variables (init's, a previous apply's): one apply is one
                # generation.
                start = jnp.array(0, dtype=jnp.int32)
                old_key = jnp.zeros(shape, key.dtype)
                old_value = jnp.zeros(shape, value.dtype)
            else:
                start = index.value
                old_key, old_value = cached_key.value, cached_value.value
            cached_key.value = jax.lax.dynamic_update_slice(old_key, key, (0, start, 0, 0))
            cached_value.value = jax.lax.dynamic_update_slice(old_value, value, (0, start, 0, 0))
            index.value = start + length
            key, value = cached_key.value, cached_value.value
            q_pos = start + q_pos
            # Slots past the current position (unfilled or stale) fall
            # outside the causal mask below, so they need no mask of their own.
            k_pos = jnp.arange(self.max_len)

        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
        scores = scores / np.sqrt(head_dim).astype(np.float32)
        causal = k_pos[None, :] <= q_pos[:, None]
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        # Softmax in float32 whatever the compute dtype: masked slots must
        # become exact zeros so cached and uncached attention agree.
        weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        attended = attended.reshape(batch, length, features)
        return nn.Dense(features, dtype=dtype, name="out")(attended)


class MLP(nn.Module):
    """Seed-1's feed-forward: Dense, gelu, Dense (``Dense_0``, ``Dense_1``).

    Attributes:
        hidden_dim: width of both layers.
        dtype: computation dtype.
    """

    hidden_dim: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the MLP to ``(..., hidden_dim)``."""
        dtype = _dtype(self.dtype)
        x = nn.Dense(self.hidden_dim, dtype=dtype)(x)
        x = nn.gelu(x)
        return nn.Dense(self.hidden_dim, dtype=dtype)(x)


class CausalBlock(nn.Module):
    """One layer of `CausalLM`: ``x += self_attention(x); x += mlp(x)``.

    Params: ``self_attention/{query,key,value,out}/{bias,kernel}``,
    ``mlp/{Dense_0,Dense_1}/{bias,kernel}``. Called as ``block(x)`` it runs
    without a cache, so it also works as a ``--block`` target.

    Attributes:
        hidden_dim: model width.
        num_heads: attention heads.
        max_len: KV cache length.
        dtype: computation dtype.
    """

    hidden_dim: int = 32
    num_heads: int = 4
    max_len: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mode: str = "full") -> jax.Array:
        """Applies the layer.

        Args:
            x: ``(batch, seq, hidden_dim)``.
            mode: see `CausalSelfAttention`.

        Returns:
            ``(batch, seq, hidden_dim)``.
        """
        attention = CausalSelfAttention(
            num_heads=self.num_heads,
            max_len=self.max_len,
            dtype=self.dtype,
            name="self_attention",
        )
        x = x + attention(x, mode)
        return x + MLP(hidden_dim=self.hidden_dim, dtype=self.dtype, name="mlp")(x)


class CausalLM(nn.Module):
    """Seed-1's causal LM with a KV cache, in loop or scan form.

    Params: ``embed/embedding``, ``layer_{i}/...`` (loop) or ``blocks/...``
    stacked on axis 0 (scan; see `CausalBlock` for a layer's tree) and
    ``lm_head/{bias,kernel}``.

    ``apply(variables, tokens, mutable=True)`` (or ``mutable=["cache", ...]``)
    generates: the KV cache is a flax ``cache`` collection, so it must be
    mutable. ``apply(variables, tokens, method="logits")`` is the plain
    forward pass without cache, for cross-checks.

    Attributes:
        vocab_size: vocabulary size.
        hidden_dim: model width.
        num_layers: N.
        num_heads: attention heads.
        max_len: KV cache length; ``prompt_len + decode_steps`` must fit.
        dtype: computation dtype (params stay float32; logits are returned as
            float32).
        scan: scan form (``blocks``) instead of loop form (``layer_{i}``).
        decode_steps: greedy tokens generated per call.
    """

    vocab_size: int = 64
    hidden_dim: int = 32
    num_layers: int = 4
    num_heads: int = 4
    max_len: int = 12
    dtype: Any = jnp.float32
    scan: bool = False
    decode_steps: int = 4

    def setup(self) -> None:
        """Creates ``embed``, the layers and ``lm_head``."""
        dtype = _dtype(self.dtype)
        self.embed = nn.Embed(self.vocab_size, self.hidden_dim, dtype=dtype)
        kwargs = {
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "max_len": self.max_len,
            "dtype": dtype,
        }
        if self.scan:
            # Cache variables are stacked per layer on axis 0 like the params.
            self.blocks = scan_blocks(CausalBlock, self.num_layers)(**kwargs)
        else:
            self.layers = [CausalBlock(name=f"layer_{i}", **kwargs) for i in range(self.num_layers)]
        self.lm_head = nn.Dense(self.vocab_size, dtype=dtype)

    def _layers(self, x: jax.Array, mode: str) -> jax.Array:
        if self.scan:
            x, _ = self.blocks(x, mode)
            return x
        for layer in self.layers:
            x = layer(x, mode)
        return x

    def _head(self, x: jax.Array) -> jax.Array:
        return self.lm_head(x).astype(jnp.float32)

    def logits(self, tokens: jax.Array) -> jax.Array:
        """The plain forward pass: no cache, causal attention over ``tokens``.

        Args:
            tokens: ``(batch, seq)`` int token ids.

        Returns:
            ``(batch, seq, vocab_size)`` float32 logits at every position.
        """
        return self._head(self._layers(self.embed(tokens), "full"))

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Prefills the cache with ``tokens``, then decodes greedily.

        Args:
            tokens: ``(batch, prompt_len)`` int prompt token ids.

        Returns:
            ``(logits, generated)``: ``(batch, decode_steps + 1, vocab_size)``
            float32, the last-position logits of the prefill and of each
            decode step; ``(batch, decode_steps)`` int32, the greedy tokens
            (``generated[:, s] = argmax(logits[:, s])``).

        Raises:
            ValueError: the prompt and the decode steps do not fit in
                ``max_len``, or the ``cache`` collection is not mutable.
        """
        batch, prompt_len = tokens.shape
        if prompt_len + self.decode_steps > self.max_len:
            raise ValueError(
                f"prompt length {prompt_len} + decode_steps {self.decode_steps} "
                f"exceeds max_len {self.max_len}; raise max_len"
            )
        if not self.is_mutable_collection("cache"):
            raise ValueError(
                "CausalLM keeps its KV cache in the 'cache' collection: call "
                "apply(..., mutable=True) or mutable=['cache', ...]"
            )
        x = self._layers(self.embed(tokens), "prefill")
        step_logits = self._head(x[:, -1])
        self.sow("intermediates", "step_logits", step_logits)
        all_logits, generated = [step_logits], []
        for _ in range(self.decode_steps):
            token = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
            self.sow("intermediates", "step_tokens", token)
            generated.append(token)
            x = self._layers(self.embed(token[:, None]), "decode")
            step_logits = self._head(x[:, -1])
            self.sow("intermediates", "step_logits", step_logits)
            all_logits.append(step_logits)
        if generated:
            tokens_out = jnp.stack(generated, axis=1)
        else:
            tokens_out = jnp.zeros((batch, 0), dtype=jnp.int32)
        return jnp.stack(all_logits, axis=1), tokens_out


# ---------------------------------------------------------------------------
# --model targets
# ---------------------------------------------------------------------------


def _block_models(
    block: type[nn.Module],
    *,
    num_layers: int,
    hidden_dim: int,
    num_heads: int,
    batch: int,
    seq: int,
    dtype: Any,
    seed: int,
    pattern: str,
    into: str,
    axis: int,
) -> tuple[LoopModel, ScanModel, tuple[np.ndarray]]:
    kwargs = {"hidden_dim": hidden_dim, "num_heads": num_heads, "dtype": _dtype(dtype)}
    loop = LoopModel(block=block, num_layers=num_layers, block_kwargs=kwargs, pattern=pattern)
    scan = ScanModel(block=block, num_layers=num_layers, block_kwargs=kwargs, into=into, axis=axis)
    # The input stays float32 whatever `dtype`: the blocks' Dense_0 computes in
    # float32, so a float32 input keeps the scan carry's dtype fixed.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq, hidden_dim)).astype(np.float32)
    return loop, scan, (x,)


def seed0(
    num_layers: int = 4,
    hidden_dim: int = 32,
    num_heads: int = 4,
    batch: int = 2,
    seq: int = 8,
    dtype: Any = "float32",
    seed: int = 0,
    pattern: str = "layer_{i}",
    into: str = "blocks",
    axis: int = 0,
) -> tuple[LoopModel, ScanModel, tuple[np.ndarray]]:
    """Seed-0's model: `AttentionDenseBlock` in loop and scan form.

    Args:
        num_layers: N.
        hidden_dim: model width.
        num_heads: attention heads.
        batch: input batch size.
        seq: input sequence length.
        dtype: computation dtype, a name such as ``"bfloat16"`` or a dtype.
        seed: seed of the numpy RNG drawing the input.
        pattern: layer names of the loop form.
        into: key of the scan form's stacked subtree.
        axis: layer axis of the scan form's params.

    Returns:
        ``(loop_module, scan_module, (x,))`` with ``x`` float32
        ``(batch, seq, hidden_dim)``.
    """
    return _block_models(
        AttentionDenseBlock,
        num_layers=num_layers,
        hidden_dim=hidden_dim,
        num_heads=num_heads,
        batch=batch,
        seq=seq,
        dtype=dtype,
        seed=seed,
        pattern=pattern,
        into=into,
        axis=axis,
    )


def seed1(**kwargs: Any) -> tuple[LoopModel, ScanModel, tuple[np.ndarray]]:
    """Seed-1's model: `NormAttentionBlock` in loop and scan form.

    Takes the same keyword arguments, with the same defaults, as `seed0`.
    """
    params = inspect.signature(seed0).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"seed1() got unexpected keyword arguments: {', '.join(unknown)}")
    args = {name: p.default for name, p in params.items()} | kwargs
    return _block_models(NormAttentionBlock, **args)


def causal_lm(
    num_layers: int = 4,
    hidden_dim: int = 32,
    num_heads: int = 4,
    vocab_size: int = 64,
    prompt_len: int = 8,
    decode_steps: int = 4,
    batch: int = 2,
    dtype: Any = "float32",
    seed: int = 0,
) -> tuple[CausalLM, CausalLM, tuple[np.ndarray]]:
    """Seed-1's KV-cache LM in loop form (``layer_{i}``) and scan form (``blocks``).

    Each ``apply`` prefills the prompt and decodes ``decode_steps`` greedy
    tokens; call it with ``mutable=True`` (the cache is a collection).

    Args:
        num_layers: N.
        hidden_dim: model width.
        num_heads: attention heads.
        vocab_size: vocabulary size.
        prompt_len: prompt length.
        decode_steps: tokens generated.
        batch: batch size.
        dtype: computation dtype, a name such as ``"bfloat16"`` or a dtype.
        seed: seed of the numpy RNG drawing the prompt.

    Returns:
        ``(loop_module, scan_module, (tokens,))`` with ``tokens`` int32
        ``(batch, prompt_len)``.
    """
    kwargs = {
        "vocab_size": vocab_size,
        "hidden_dim": hidden_dim,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "max_len": prompt_len + decode_steps,
        "dtype": _dtype(dtype),
        "decode_steps": decode_steps,
    }
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch, prompt_len), dtype=np.int32)
    return CausalLM(scan=False, **kwargs), CausalLM(scan=True, **kwargs), (tokens,)


def init_loop_params(
    loop_module: nn.Module, inputs: tuple[Any, ...], seed: int = 0
) -> dict[str, Any]:
    """Initialises a loop-form model and returns its params.

    Args:
        loop_module: the module (e.g. the first item of `seed0`'s result).
        inputs: positional args for ``init``.
        seed: seed of ``jax.random.PRNGKey``.

    Returns:
        ``loop_module.init(PRNGKey(seed), *inputs)["params"]`` as a plain
        nested dict of numpy arrays (boxed params unboxed).
    """
    variables = loop_module.init(jax.random.PRNGKey(seed), *inputs)
    params = nn.meta.unbox(flax.core.unfreeze(variables["params"]))
    return jax.tree.map(np.asarray, params)
