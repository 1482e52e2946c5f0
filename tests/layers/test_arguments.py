"""Bad arguments fail up front with an error naming them, across entries."""

from __future__ import annotations

import pytest
import torch

import attnzoo


@pytest.mark.parametrize(
    ("slug", "kwargs", "needle"),
    [
        ("mha", {"dim": 30, "n_heads": 4}, "dim"),
        ("mha", {"dim": 32, "n_heads": 0}, "n_heads"),
        ("gqa", {"dim": 32, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ("gated_attention", {"dim": 32, "n_heads": 4, "granularity": "rowwise"}, "granularity"),
        ("moh", {"dim": 32, "n_heads": 4, "n_shared": 1, "top_k": 4}, "top_k"),
        ("moh", {"dim": 32, "n_heads": 4, "router": "nope"}, "router"),
        ("shsa", {"dim": 32, "ratio": 0.5}, "ratio"),
        ("cascaded_group_attention", {"dim": 30, "n_heads": 4}, "dim"),
        ("context_broadcast", {"dim": 32, "alpha": 2.0}, "alpha"),
        ("rope", {"head_dim": 8, "rotary_dim": 3}, "rotary_dim"),
        ("relative_position_bias", {"heads": 4, "max_distance": 0}, "max_distance"),
        ("hilo", {"dim": 32, "n_heads": 2, "head_dim": 8}, "head_dim"),
        ("lightning", {"dim": 8, "n_heads": 2, "layer_idx": 3, "n_layers": 2}, "layer_idx"),
        ("selective_ssm", {"dim": 8, "dt_min": 0.0}, "dt_min"),
        ("selective_ssm", {"dim": 8, "dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
        ("cope", {"head_dim": 8, "init_std": -1.0}, "init_std"),
        ("relative_position_bias", {"heads": 4, "init_std": -1.0}, "init_std"),
        ("moh", {"dim": 32, "n_heads": 4, "dispatch": "sparse"}, "dispatch"),
        ("deconstructed_attention", {"dim": 32, "n_heads": 4, "mode": "nope"}, "mode"),
        ("deconstructed_attention", {"dim": 30, "n_heads": 4}, "dim"),
        ("deconstructed_attention", {"dim": 32, "n_heads": 4, "max_len": 0}, "max_len"),
        ("flashblock", {"dim": 32, "n_heads": 4, "block_size": 0}, "block_size"),
        ("rcmha", {"dim": 32, "n_heads": 4, "kernel_size": 0}, "kernel_size"),
        ("rcmha", {"dim": 32, "n_heads": 4, "kernel_size": 4, "conv_causal": False}, "kernel_size"),
        ("attention_adversarial", {"eps": -1.0}, "eps"),
        ("attention_adversarial", {"variant": "pgd"}, "variant"),
        ("gin_attention", {"dim": 32, "n_heads": 4, "aggregation": "sum"}, "aggregation"),
    ],
)
def test_bad_constructor_arguments(slug, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        attnzoo.create(slug, **kwargs)


def test_bad_forward_inputs():
    m = attnzoo.create("mha", dim=32, n_heads=4)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="mask"):
        m(torch.randn(2, 5, 32), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        attnzoo.create("reversed_attention", dim=32, n_heads=4)(torch.randn(1, 3, 32), causal=True)


@pytest.mark.parametrize("slug", ["mha", "tensor_attention", "linear_attention"])
def test_context_and_masks_are_checked_up_front(slug):
    """Wrong context widths and context / padding masks raise a ValueError naming the argument, whatever the
    mixer does with them later (an all-True mask of the wrong shape was once dropped silently)."""
    m = attnzoo.create(slug, dim=32, n_heads=4)
    x, ctx = torch.randn(2, 4, 32), torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match=r"^mask: expected a bool tensor \[2, 4\]"):
        m(x, mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^mask: expected a bool tensor \[2, 4\]"):
        m(x, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"^context_mask: expected a bool tensor \[2, 5\], got torch.bool \[7\]"):
        m(x, context=ctx, context_mask=torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^context_mask: given without a context"):
        m(x, context_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^context: expected a tensor \[2, M, 32\]"):
        m(x, context=torch.randn(2, 5, 40))
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 3:] = False
    assert m(x, context=ctx, context_mask=keep).shape == (2, 4, 32)


@pytest.mark.parametrize("slug", ["mha", "gqa", "swin_window", "neighborhood"])
def test_unknown_backend_fails_at_construction(slug):
    kw = dict(attnzoo.spec(slug).test_kwargs, backend="flash")
    with pytest.raises(ValueError, match=r"^backend: expected one of \['auto', 'reference'"):
        attnzoo.create(slug, **kw)


@pytest.mark.parametrize(("slug", "kwargs", "needle"), [
    ("agent_attention", {"dim": 8, "n_heads": 1, "n_agents": 8, "dwc_kernel": 2}, "dwc_kernel"),
    ("inline_attention", {"dim": 8, "n_heads": 2, "local": True, "local_kernel": 4}, "local_kernel"),
])
def test_even_depthwise_kernels_are_refused(slug, kwargs, needle):
    """'same' padding of an even kernel gave N + 1 outputs (silently, for N = 1)."""
    with pytest.raises(ValueError, match=f"^{needle}: expected an odd kernel size"):
        attnzoo.create(slug, **kwargs)



@pytest.mark.parametrize(("slug", "accepted", "refused"), [
    ("dilated_neighborhood", ["stride", "causal_axes", "output_stride"], []),
    ("kdgqa", ["rope", "score_mod"], []),
    ("probabilistic_attention", ["score_mod"], ["rope", "scale"]),  # q/k carry an extra channel: rope cannot apply
    ("reversed_attention", [], ["rope", "score_mod", "pattern", "context_dim", "n_kv_heads"]),
])
def test_registered_classes_take_their_base_classes_arguments(slug, accepted, refused):
    """The registry reads the class's signature and its bases' (less ``refused_arguments``): no factory to drift."""
    args = attnzoo.spec(slug).accepted_arguments()
    assert set(accepted) <= set(args) and not set(refused) & set(args)
    for name in refused:
        with pytest.raises(TypeError, match=f"unknown argument.*{name}"):
            attnzoo.create(slug, **{**attnzoo.spec(slug).test_kwargs, name: None})
