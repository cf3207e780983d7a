"""Tests of ckptconv.models: the seed models in loop and scan form.

The central property: stacking a loop model's per-layer params by hand gives
params for which the scan model computes the same thing, layer by layer.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckptconv import models

N = 3
HIDDEN = 16
HEADS = 4

# Measured on CPU (jax 0.10.2, flax 0.12.8), loop vs hand-stacked scan, max |diff|
# over the final output and over every captured intermediate:
#   float32: AttentionDenseBlock 0.0, NormAttentionBlock 1.2e-6 (axis 0 and 1);
#   CausalLM logits 2.4e-7, cached decode vs full forward 3.0e-7.
F32_ATOL = 1e-5
# bfloat16 (params float32, attention/norms in bfloat16): up to 0.2 on values of
# magnitude ~17 (seed0) and 0.034 on ~4 (seed1), i.e. a few bfloat16 ulps. The
# cause is XLA's excess-precision rewrite (fusions skip some bf16 roundings), which
# fuses the unrolled loop and the scan body differently: with
# XLA_FLAGS=--xla_allow_excess_precision=false the difference is exactly 0.
BF16_REL = 0.03

SEED0_LAYER_PATHS = {
    "Dense_0/bias",
    "Dense_0/kernel",
    *(
        f"self_attention/{p}/{leaf}"
        for p in ("key", "out", "query", "value")
        for leaf in ("bias", "kernel")
    ),
}
SEED1_LAYER_PATHS = SEED0_LAYER_PATHS | {"RMSNorm_0/scale", "RMSNorm_1/scale"}
LM_LAYER_PATHS = {
    *(
        f"self_attention/{p}/{leaf}"
        for p in ("key", "out", "query", "value")
        for leaf in ("bias", "kernel")
    ),
    *(f"mlp/{d}/{leaf}" for d in ("Dense_0", "Dense_1") for leaf in ("bias", "kernel")),
}
FACTORIES = {"seed0": models.seed0, "seed1": models.seed1}


def paths(tree) -> dict[str, tuple[int, ...]]:
    """``{"a/b/c": shape}`` for every leaf of a nested dict."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.shape(leaf) for path, leaf in flat}


def stack(loop_params, n=N, axis=0, pattern="layer_{i}", into="blocks"):
    """The scan params for ``loop_params``, built by hand (not by ckptconv.tree)."""
    names = [pattern.format(i=i) for i in range(n)]
    out = {k: v for k, v in loop_params.items() if k not in names}
    out[into] = jax.tree.map(lambda *xs: np.stack(xs, axis), *[loop_params[k] for k in names])
    return out


def max_diff(a, b) -> float:
    """Max |a - b| over all leaves of two trees of the same structure."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    diffs = jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs))


@functools.cache
def captured(module):
    """A jitted ``apply`` capturing every intermediate (compiled once per module)."""
    return jax.jit(lambda v, *xs: module.apply(v, *xs, capture_intermediates=True, mutable=True))


# ---------------------------------------------------------------------------
# Blocks, LoopModel, ScanModel
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layer_paths"), [("seed0", SEED0_LAYER_PATHS), ("seed1", SEED1_LAYER_PATHS)]
)
def test_loop_param_tree(name, layer_paths):
    loop, _, inputs = FACTORIES[name](num_layers=N, hidden_dim=HIDDEN, num_heads=HEADS)
    params = models.init_loop_params(loop, inputs)
    assert type(params) is dict
    assert set(params) == {f"layer_{i}" for i in range(N)}
    for i in range(N):
        layer = paths(params[f"layer_{i}"])
        assert set(layer) == layer_paths
        assert layer["Dense_0/kernel"] == (HIDDEN, HIDDEN)
        assert layer["self_attention/query/kernel"] == (HIDDEN, HEADS, HIDDEN // HEADS)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    # Distinct layers get distinct init values.
    k0 = params["layer_0"]["Dense_0"]["kernel"]
    assert not np.array_equal(k0, params["layer_1"]["Dense_0"]["kernel"])


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", ["seed0", "seed1"])
def test_scan_init_layout(name, axis):
    loop, scan, inputs = FACTORIES[name](
        num_layers=N, hidden_dim=HIDDEN, num_heads=HEADS, axis=axis
    )
    loop_shapes = paths(models.init_loop_params(loop, inputs)["layer_0"])
    # eval_shape: only the layout matters here, and it skips running init.
    scan_params = jax.eval_shape(scan.init, jax.random.PRNGKey(0), *inputs)["params"]
    assert set(scan_params) == {"blocks"}  # no wrapper level under it either:
    scan_shapes = paths(scan_params["blocks"])
    assert set(scan_shapes) == set(loop_shapes)
    for path, shape in loop_shapes.items():
        expected = list(shape)
        expected.insert(axis, N)
        assert scan_shapes[path] == tuple(expected), path


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", ["seed0", "seed1"])
def test_loop_equals_stacked_scan(name, axis):
    loop, scan, inputs = FACTORIES[name](
        num_layers=N, hidden_dim=HIDDEN, num_heads=HEADS, axis=axis
    )
    loop_params = models.init_loop_params(loop, inputs)
    scan_params = stack(loop_params, axis=axis)
    y_loop, s_loop = captured(loop)({"params": loop_params}, *inputs)
    y_scan, s_scan = captured(scan)({"params": scan_params}, *inputs)
    assert y_loop.shape == y_scan.shape == inputs[0].shape
    assert max_diff(y_loop, y_scan) <= F32_ATOL
    # Every captured value of every layer, per layer.
    i_loop, i_scan = s_loop["intermediates"], s_scan["intermediates"]
    assert max_diff(i_loop["__call__"], i_scan["__call__"]) <= F32_ATOL
    for i in range(N):
        layer_of_scan = jax.tree.map(lambda x, i=i: x[i], i_scan["blocks"])
        assert max_diff(i_loop[f"layer_{i}"], layer_of_scan) <= F32_ATOL
    # The final output is the last layer's hidden state.
    np.testing.assert_array_equal(i_scan["blocks"]["__call__"][0][0][-1], y_scan)


@pytest.mark.parametrize("name", ["seed0", "seed1"])
def test_loop_equals_stacked_scan_bfloat16(name):
    loop, scan, inputs = FACTORIES[name](
        num_layers=N, hidden_dim=HIDDEN, num_heads=HEADS, dtype="bfloat16"
    )
    assert loop.block_kwargs["dtype"] == jnp.bfloat16
    loop_params = models.init_loop_params(loop, inputs)
    y_loop = jax.jit(loop.apply)({"params": loop_params}, *inputs)
    y_scan = jax.jit(scan.apply)({"params": stack(loop_params)}, *inputs)
    # The blocks' Dense_0 computes in float32, so the output (and the carry) is float32.
    assert y_loop.dtype == y_scan.dtype == jnp.float32
    assert max_diff(y_loop, y_scan) <= BF16_REL * float(np.max(np.abs(y_loop)))


def test_custom_pattern_into_axis():
    loop, scan, inputs = models.seed1(
        num_layers=2, hidden_dim=HIDDEN, num_heads=2, pattern="h_{i}", into="stack", axis=1
    )
    loop_params = models.init_loop_params(loop, inputs)
    assert set(loop_params) == {"h_0", "h_1"}
    scan_params = stack(loop_params, n=2, axis=1, pattern="h_{i}", into="stack")
    assert scan_params["stack"]["RMSNorm_1"]["scale"].shape == (HIDDEN, 2)
    y_loop, s_loop = captured(loop)({"params": loop_params}, *inputs)
    y_scan, s_scan = captured(scan)({"params": scan_params}, *inputs)
    assert max_diff(y_loop, y_scan) <= F32_ATOL
    assert set(s_loop["intermediates"]) == {"__call__", "h_0", "h_1"}
    assert set(s_scan["intermediates"]) == {"__call__", "stack"}
    # Intermediates stack on axis 0 whatever the params' axis.
    assert s_scan["intermediates"]["stack"]["Dense_0"]["__call__"][0].shape == (2, *inputs[0].shape)


@pytest.mark.parametrize("name", ["seed0", "seed1"])
def test_intermediates_structure(name):
    loop, scan, inputs = FACTORIES[name](num_layers=N, hidden_dim=HIDDEN, num_heads=HEADS)
    loop_params = models.init_loop_params(loop, inputs)
    _, s_loop = captured(loop)({"params": loop_params}, *inputs)
    _, s_scan = captured(scan)({"params": stack(loop_params)}, *inputs)
    i_loop, i_scan = s_loop["intermediates"], s_scan["intermediates"]
    batch, seq, hidden = inputs[0].shape

    submodules = {"__call__", "Dense_0", "self_attention"}
    seed_out = {"input_hidden_state", "+self_attention", "+dense"}
    if name == "seed1":
        submodules |= {"RMSNorm_0", "RMSNorm_1"}
        seed_out |= {"pre_attention_norm", "pre_ffw_norm"}
    assert set(i_loop) == {"__call__"} | {f"layer_{i}" for i in range(N)}
    assert set(i_scan) == {"__call__", "blocks"}
    for layer, lead in [(i_loop["layer_1"], ()), (i_scan["blocks"], (N,))]:
        assert set(layer) == submodules
        assert set(layer["self_attention"]) == {"__call__", "query", "key", "value", "out"}
        # One call each: a 1-tuple holding the module's return value.
        (block_out,) = layer["__call__"]
        x, out = block_out
        assert x.shape == (*lead, batch, seq, hidden)
        assert set(out) == seed_out
        (dense,) = layer["Dense_0"]["__call__"]
        assert dense.shape == (*lead, batch, seq, hidden)
        (query,) = layer["self_attention"]["query"]["__call__"]
        assert query.shape == (*lead, batch, seq, HEADS, hidden // HEADS)
    (final,) = i_loop["__call__"]
    assert final.shape == (batch, seq, hidden)


def test_resolve_block_forms():
    kwargs = {"hidden_dim": 8}
    cls = models.AttentionDenseBlock
    assert models.resolve_block(cls, kwargs) == (cls, kwargs)
    assert models.resolve_block(lambda: cls, kwargs) == (cls, kwargs)
    partial = functools.partial(cls, num_heads=2)
    assert models.resolve_block(partial, kwargs) == (cls, {"num_heads": 2, "hidden_dim": 8})
    got_cls, got = models.resolve_block(lambda: cls(hidden_dim=8, num_heads=2), {"num_heads": 1})
    assert got_cls is cls
    assert got == {"hidden_dim": 8, "num_heads": 1, "dtype": jnp.float32}
    with pytest.raises(TypeError):
        models.resolve_block(lambda: 3)
    with pytest.raises(TypeError):
        models.resolve_block("ckptconv.models:AttentionDenseBlock")


def test_block_returning_bare_x():
    """A block returning ``x`` (not a tuple) works in both wrappers."""
    kwargs = {"hidden_dim": HIDDEN, "num_heads": 2, "max_len": 8}
    loop = models.LoopModel(block=models.CausalBlock, num_layers=2, block_kwargs=kwargs)
    scan = models.ScanModel(block=models.CausalBlock, num_layers=2, block_kwargs=kwargs, axis=1)
    x = np.random.default_rng(1).standard_normal((2, 5, HIDDEN)).astype(np.float32)
    loop_params = models.init_loop_params(loop, (x,))
    y_loop = loop.apply({"params": loop_params}, x)
    y_scan = scan.apply({"params": stack(loop_params, n=2, axis=1)}, x)
    assert max_diff(y_loop, y_scan) <= F32_ATOL


def test_scan_of_module_with_sow_and_batch_stats():
    """Other collections (batch_stats, a sown scalar) stack too, with axis=1."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            self.sow("losses", "norm", jnp.sum(x**2))
            x = nn.BatchNorm(use_running_average=False)(x)
            return nn.Dense(x.shape[-1])(x)

    x = jnp.ones((4, HIDDEN))
    scan = models.ScanModel(block=Block, num_layers=N, axis=1)
    variables = scan.init(jax.random.PRNGKey(0), x)
    assert variables["batch_stats"]["blocks"]["BatchNorm_0"]["mean"].shape == (HIDDEN, N)
    assert variables["params"]["blocks"]["Dense_0"]["kernel"].shape == (HIDDEN, N, HIDDEN)
    assert variables["losses"]["blocks"]["norm"][0].shape == (N,)


# ---------------------------------------------------------------------------
# CausalLM
# ---------------------------------------------------------------------------

LM = {"num_layers": 2, "hidden_dim": HIDDEN, "num_heads": 2, "vocab_size": 32}
PROMPT, STEPS = 6, 3


@pytest.fixture(scope="module")
def lm():
    loop, scan, inputs = models.causal_lm(**LM, prompt_len=PROMPT, decode_steps=STEPS)
    loop_params = models.init_loop_params(loop, inputs)
    scan_params = stack(loop_params, n=LM["num_layers"])
    (logits_l, gen_l), s_loop = captured(loop)({"params": loop_params}, *inputs)
    (logits_s, gen_s), s_scan = captured(scan)({"params": scan_params}, *inputs)
    return {
        "modules": (loop, scan),
        "params": (loop_params, scan_params),
        "inputs": inputs,
        "outputs": ((logits_l, gen_l), (logits_s, gen_s)),
        "states": (s_loop, s_scan),
    }


def test_causal_lm_inputs_and_params(lm):
    loop, scan = lm["modules"]
    (tokens,) = lm["inputs"]
    assert tokens.dtype == np.int32 and tokens.shape == (2, PROMPT)
    assert (not loop.scan) and scan.scan and loop.max_len == PROMPT + STEPS
    loop_params, _ = lm["params"]
    assert set(loop_params) == {"embed", "layer_0", "layer_1", "lm_head"}
    assert set(paths(loop_params["layer_0"])) == LM_LAYER_PATHS
    scan_init = jax.eval_shape(scan.init, jax.random.PRNGKey(0), tokens)["params"]
    assert set(scan_init) == {"embed", "blocks", "lm_head"}
    assert paths(scan_init) == paths(lm["params"][1])
    # Same tokens, same seed: the same prompt every time.
    np.testing.assert_array_equal(tokens, models.causal_lm(**LM, prompt_len=PROMPT)[2][0])


def test_causal_lm_loop_equals_scan(lm):
    (logits_l, gen_l), (logits_s, gen_s) = lm["outputs"]
    assert logits_l.shape == (2, STEPS + 1, LM["vocab_size"]) and logits_l.dtype == jnp.float32
    assert gen_l.shape == (2, STEPS) and gen_l.dtype == jnp.int32
    np.testing.assert_array_equal(gen_l, gen_s)
    np.testing.assert_array_equal(gen_l, np.argmax(logits_l[:, :STEPS], axis=-1))
    assert max_diff(logits_l, logits_s) <= F32_ATOL
    s_loop, s_scan = lm["states"]
    i_loop, i_scan = s_loop["intermediates"], s_scan["intermediates"]
    # Step by step: logits sown per step, tokens per decode step.
    assert len(i_loop["step_logits"]) == len(i_scan["step_logits"]) == STEPS + 1
    assert len(i_loop["step_tokens"]) == STEPS
    assert max_diff(i_loop["step_logits"], i_scan["step_logits"]) <= F32_ATOL
    np.testing.assert_array_equal(np.stack(i_loop["step_tokens"], 1), gen_l)
    # Every layer, every call (prefill + each decode step).
    assert set(i_loop) == {
        "__call__",
        "embed",
        "layer_0",
        "layer_1",
        "lm_head",
        "step_logits",
        "step_tokens",
    }
    assert set(i_scan) == {"__call__", "embed", "blocks", "lm_head", "step_logits", "step_tokens"}
    for i in range(LM["num_layers"]):
        layer = i_loop[f"layer_{i}"]
        assert set(layer) == {"__call__", "self_attention", "mlp"}
        assert len(layer["__call__"]) == STEPS + 1
        assert layer["__call__"][0].shape == (2, PROMPT, HIDDEN)
        assert layer["__call__"][1].shape == (2, 1, HIDDEN)
        assert max_diff(layer, jax.tree.map(lambda x, i=i: x[i], i_scan["blocks"])) <= F32_ATOL
    # The cache, per layer / stacked.
    c_loop, c_scan = s_loop["cache"], s_scan["cache"]
    assert set(c_loop) == {"layer_0", "layer_1"} and set(c_scan) == {"blocks"}
    attn = c_loop["layer_0"]["self_attention"]
    assert set(attn) == {"cache_index", "cached_key", "cached_value"}
    assert int(attn["cache_index"]) == PROMPT + STEPS
    assert attn["cached_key"].shape == (2, PROMPT + STEPS, 2, HIDDEN // 2)
    assert c_scan["blocks"]["self_attention"]["cached_key"].shape == (
        LM["num_layers"],
        *attn["cached_key"].shape,
    )
    np.testing.assert_array_equal(c_scan["blocks"]["self_attention"]["cache_index"], PROMPT + STEPS)


def test_causal_lm_cache_matches_full_forward(lm):
    (tokens,) = lm["inputs"]
    for module, params, (logits, generated) in zip(lm["modules"], lm["params"], lm["outputs"]):
        # The decode step s sees prompt + generated[:s]; the full forward over
        # prompt + generated gives those logits at positions PROMPT-1 ... end.
        sequence = np.concatenate([tokens, np.asarray(generated)], axis=1)
        full = jax.jit(functools.partial(module.apply, method="logits"))(
            {"params": params}, sequence
        )
        assert full.shape == (2, PROMPT + STEPS, LM["vocab_size"])
        assert max_diff(full[:, PROMPT - 1 :], logits) <= F32_ATOL


def test_causal_lm_cache_from_init_is_reset(lm):
    """A cache passed in with the variables (here init's) does not leak into prefill."""
    loop, _ = lm["modules"]
    variables = loop.init(jax.random.PRNGKey(0), *lm["inputs"])
    assert "cache" in variables
    (logits, generated), _ = jax.jit(lambda v, t: loop.apply(v, t, mutable=["cache"]))(
        variables, *lm["inputs"]
    )
    want_logits, want_generated = lm["outputs"][0]
    np.testing.assert_array_equal(generated, want_generated)
    assert max_diff(logits, want_logits) <= F32_ATOL


def test_causal_lm_errors(lm):
    loop, _ = lm["modules"]
    params = {"params": lm["params"][0]}
    with pytest.raises(ValueError, match="mutable"):
        loop.apply(params, *lm["inputs"])
    too_long = np.zeros((1, PROMPT + 1), np.int32)
    with pytest.raises(ValueError, match="max_len"):
        loop.apply(params, too_long, mutable=True)


def test_replace_submodule_keeps_the_name_and_the_rest():
    class Outer(nn.Module):
        def setup(self):
            self.inner = nn.Dense(3)
            self.head = nn.Dense(2)

        def __call__(self, x):
            return self.head(self.inner(x))

    def wider(old):
        assert isinstance(old, nn.Dense) and old.features == 3  # setup's own, to read from
        return nn.Dense(old.features + 2)

    Wide = models.replace_submodule(Outer, "inner", wider)
    assert Wide.__name__ == "Outer" and issubclass(Wide, Outer)
    x = jnp.ones((1, 4))
    params = Wide().init(jax.random.PRNGKey(0), x)["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "inner": {"kernel": (4, 5), "bias": (5,)}, "head": {"kernel": (5, 2), "bias": (2,)},
    }
    assert jax.tree.map(jnp.shape, Outer().init(jax.random.PRNGKey(0), x)["params"])["inner"]["kernel"] == (4, 3)
