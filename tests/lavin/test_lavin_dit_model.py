"""LaVinDiTTransformer3DModel: init, gradients, round trip, packing, and conformance with the official layout.

The official J-DiT (``DerrickWang005/LaVin-DiT`` ``lib/model/{dit,blocks}.py``) needs apex and flash-attn, so the
reference here is an independent, literal re-statement of its forward on the *official* state-dict names
(``_official_forward``); the genvis model must reproduce it after :func:`convert_official_lavin_dit_state_dict`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genvis.models import LAVIN_DIT_PRESETS, LaVinDiTTransformer3DModel, convert_official_lavin_dit_state_dict
from genvis.models.lavin_dit import lavin_dit_mlp_hidden_dim

TINY = {"num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2, "attention_head_dim": 12, "in_channels": 4}


def _tiny(**overrides) -> LaVinDiTTransformer3DModel:
    return LaVinDiTTransformer3DModel(**{**TINY, **overrides})


def _randomise_zero_init(model: torch.nn.Module, std: float = 0.1) -> None:
    """Zero-initialised layers block all gradients at step 0; give them values so every path is exercised."""
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.normal_(0, std)


def _inputs(batch=2, channels=4, t_x=1, t_c=5, size=8):
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(batch, channels, t_x, size, size, generator=gen)
    context = torch.randn(batch, channels, t_c, size, size, generator=gen)
    return target, context, torch.rand(batch, generator=gen)


def test_zero_init_predicts_zero_and_blocks_are_identity():
    model = _tiny()
    target, context, t = _inputs()
    out = model(target, context, t).sample
    assert out.shape == target.shape and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0
    # gates are tanh(0) = 0: the target stream leaving the blocks equals the embedded tokens
    for block in model.transformer_blocks:
        assert torch.count_nonzero(block.target_modulation.linear.weight) == 0


def test_every_parameter_gets_a_finite_nonzero_gradient():
    model = _tiny()
    _randomise_zero_init(model)
    target, context, t = _inputs()
    model(target, context, t).sample.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0]
    assert not missing and not zero, (missing, zero)


def test_save_load_round_trip(tmp_path):
    model = _tiny()
    _randomise_zero_init(model)
    model.save_pretrained(tmp_path)
    loaded = LaVinDiTTransformer3DModel.from_pretrained(tmp_path)
    public = {k: v for k, v in model.config.items() if not k.startswith("_")}
    assert {k: loaded.config[k] for k in public} == public
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    target, context, t = _inputs()
    torch.testing.assert_close(loaded(target, context, t).sample, model(target, context, t).sample, rtol=0, atol=0)


def test_packed_matches_padded_and_variable_lengths():
    model = _tiny().eval()
    _randomise_zero_init(model)
    target, context, t = _inputs(t_c=5)
    with torch.no_grad():
        padded = model(target, context, t).sample
        packed = model(list(target), list(context), t).sample
        torch.testing.assert_close(torch.stack(packed), padded, rtol=1e-5, atol=1e-5)
        # variable context length and size per sample == each sample run alone
        small_target, small_context, _ = _inputs(batch=1, t_c=2, size=4)
        mixed = model([target[0], small_target[0]], [context[0], small_context[0]], t).sample
        alone = model(small_target, small_context, t[1:]).sample
        torch.testing.assert_close(mixed[1], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[0], padded[0], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_matches():
    model = _tiny()
    _randomise_zero_init(model)
    target, context, t = _inputs()
    model(target, context, t).sample.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(target, context, t).sample.sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention_head_dim": 16}, "divisible by 6"),
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_bad_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**overrides)


def test_bad_input_errors():
    model = _tiny()
    target, context, t = _inputs()
    with pytest.raises(ValueError, match="divisible by 2"):
        model(target[..., :7, :7], context[..., :7, :7], t)
    with pytest.raises(ValueError, match="C=4"):
        model(target[:, :3], context[:, :3], t)
    with pytest.raises(ValueError, match="timestep"):
        model(target, context, torch.rand(3))
    with pytest.raises(ValueError, match="must share H, W"):
        model(target, context[..., :4, :4], t)
    with pytest.raises(ValueError, match="unknown LaVin-DiT preset"):
        LaVinDiTTransformer3DModel.from_preset("7B")


def test_preset_sizes_match_the_spec():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in LaVinDiTTransformer3DModel.from_preset(name).parameters()) for name in
                  ("0.1B", "1.0B", "3.4B")}  # fmt: skip
    # official counts are 0.107B / 1.08B / 3.399B; genvis drops the last block's output-irrelevant context weights
    # (q, out-proj, MLP, 3 of 4 modulation chunks) = 2D^2 + 8D^2 + 3D^2 per model
    for name, official in (("0.1B", 0.107e9), ("1.0B", 1.081e9), ("3.4B", 3.399e9)):
        dim = LAVIN_DIT_PRESETS[name]["num_attention_heads"] * LAVIN_DIT_PRESETS[name]["attention_head_dim"]
        dropped = (2 + 3) * dim * dim + 3 * dim * lavin_dit_mlp_hidden_dim(dim) + 3 * dim
        assert abs(counts[name] + dropped - official) / official < 0.002, (name, counts[name] + dropped)
    assert lavin_dit_mlp_hidden_dim(2304) == 6144 and lavin_dit_mlp_hidden_dim(1152) == 3072


# ---------------------------------------------------------------------------------------------------------------
# Official layout
# ---------------------------------------------------------------------------------------------------------------


def _official_state_dict(dim, depth, heads, kv_heads, channels, patch, gen) -> dict[str, torch.Tensor]:
    """Random tensors under the official names and shapes (``LaVinDiT`` / ``Block`` / ``Attention`` / ``SwiGLU``)."""
    hd, hidden, pdim = dim // heads, lavin_dit_mlp_hidden_dim(dim), patch * patch * channels

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    sd = {
        "cond_embedder.0.weight": r(dim, pdim), "cond_embedder.0.bias": r(dim),
        "cond_embedder.1.weight": 1 + r(dim), "cond_embedder.1.bias": r(dim),
        "x_embedder.0.weight": r(dim, pdim), "x_embedder.0.bias": r(dim),
        "x_embedder.1.weight": 1 + r(dim), "x_embedder.1.bias": r(dim),
        "prompt_embed": r(1, dim), "answer_embed": r(1, dim),
        "t_embedder.mlp.0.weight": r(dim, 256), "t_embedder.mlp.0.bias": r(dim),
        "t_embedder.mlp.2.weight": r(dim, dim), "t_embedder.mlp.2.bias": r(dim),
        "final_layer.linear.weight": r(pdim, dim), "final_layer.linear.bias": r(pdim),
        "final_layer.adaLN_modulation.1.weight": r(dim, dim), "final_layer.adaLN_modulation.1.bias": r(dim),
    }  # fmt: skip
    for i in range(depth):
        for s in ("cond", "x"):
            b = f"blocks.{i}."
            sd.update({
                f"{b}joint_attn.{s}_q.weight": r(heads * hd, dim), f"{b}joint_attn.{s}_k.weight": r(kv_heads * hd, dim),
                f"{b}joint_attn.{s}_v.weight": r(kv_heads * hd, dim),
                f"{b}joint_attn.{s}_qnorm.weight": 1 + r(heads * hd), f"{b}joint_attn.{s}_knorm.weight": 1 + r(kv_heads * hd),
                f"{b}joint_attn.{s}_proj.weight": r(dim, heads * hd),
                f"{b}{s}_mlp.gate_proj.weight": r(hidden, dim), f"{b}{s}_mlp.up_proj.weight": r(hidden, dim),
                f"{b}{s}_mlp.down_proj.weight": r(dim, hidden),
                f"{b}{s}_modulation.1.weight": r(4 * dim, dim), f"{b}{s}_modulation.1.bias": r(4 * dim),
            })  # fmt: skip
    return sd


def _official_forward(sd, x, t, cond, depth, heads, kv_heads, patch):
    """The official forward restated on the official names: x (B,C,Tx,H,W), cond (B,C,Tc,H,W), t (B,)."""
    B, C, Tx, H, W = x.shape
    Tc, h, w = cond.shape[2], H // patch, W // patch

    def tokens(z):  # "B C F (H pH) (W pW) -> B (F H W) (pH pW C)"
        return z.reshape(B, C, -1, h, patch, w, patch).permute(0, 2, 3, 5, 4, 6, 1).reshape(B, -1, patch * patch * C)

    def lin(v, name, bias=True):
        return F.linear(v, sd[f"{name}.weight"], sd.get(f"{name}.bias") if bias else None)

    def rms(v, weight=None):
        return F.rms_norm(v, (v.shape[-1],), weight, 1e-6)

    def embed(z, name):
        return F.layer_norm(lin(tokens(z), f"{name}.0"), (sd[f"{name}.0.weight"].shape[0],),
                            sd[f"{name}.1.weight"], sd[f"{name}.1.bias"])  # fmt: skip

    c, xx = embed(cond, "cond_embedder"), embed(x, "x_embedder")
    D = c.shape[-1]
    hd, third = D // heads, D // heads // 3
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    t_cond, t_x = temb + sd["prompt_embed"], temb + sd["answer_embed"]

    # 3D RoPE tables over (Tc+Tx, h, w), rotate-half within each third
    grid = torch.stack(torch.meshgrid(torch.arange(Tc + Tx), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    grid = grid.reshape(-1, 3).float()
    inv = 1.0 / 10000 ** (torch.arange(0, third, 2).float() / third)

    def rope(v):
        parts = []
        for axis, vp in enumerate(v.split(third, -1)):
            ang = grid[:, axis : axis + 1] * inv[None]
            cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
            v1, v2 = vp.chunk(2, -1)
            parts.append(vp * cos + torch.cat([-v2, v1], -1) * sin)
        return torch.cat(parts, -1)

    for i in range(depth):
        b = f"blocks.{i}."
        mc = lin(F.silu(t_cond), f"{b}cond_modulation.1").reshape(B, 4, -1).chunk(4, 1)
        mx = lin(F.silu(t_x), f"{b}x_modulation.1").reshape(B, 4, -1).chunk(4, 1)
        cm, xm = rms(c) * (1 + mc[0]), rms(xx) * (1 + mx[0])
        q, k, v = [], [], []
        for s, z in (("cond", cm), ("x", xm)):
            q.append(
                rms(lin(z, f"{b}joint_attn.{s}_q", False), sd[f"{b}joint_attn.{s}_qnorm.weight"]).unflatten(
                    -1, (heads, hd)
                )
            )
            k.append(
                rms(lin(z, f"{b}joint_attn.{s}_k", False), sd[f"{b}joint_attn.{s}_knorm.weight"]).unflatten(
                    -1, (kv_heads, hd)
                )
            )
            v.append(lin(z, f"{b}joint_attn.{s}_v", False).unflatten(-1, (kv_heads, hd)))  # fmt: skip
        q, k, v = rope(torch.cat(q, 1)), rope(torch.cat(k, 1)), torch.cat(v, 1)
        k, v = k.repeat_interleave(heads // kv_heads, 2), v.repeat_interleave(heads // kv_heads, 2)
        attn = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * hd**-0.5, -1)
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v).flatten(-2)
        co, xo = out.split([c.shape[1], xx.shape[1]], 1)
        c = c + mc[1].tanh() * rms(lin(co, f"{b}joint_attn.cond_proj", False))
        xx = xx + mx[1].tanh() * rms(lin(xo, f"{b}joint_attn.x_proj", False))

        def mlp(z, s, b=b):
            return lin(F.silu(lin(z, f"{b}{s}_mlp.gate_proj", False)) * lin(z, f"{b}{s}_mlp.up_proj", False),
                       f"{b}{s}_mlp.down_proj", False)  # fmt: skip

        c = c + mc[3].tanh() * rms(mlp(rms(c) * (1 + mc[2]), "cond"))
        xx = xx + mx[3].tanh() * rms(mlp(rms(xx) * (1 + mx[2]), "x"))

    scale = lin(F.silu(t_x), "final_layer.adaLN_modulation.1")[:, None]
    out = lin(rms(xx) * (1 + scale), "final_layer.linear")  # (B, Tx*h*w, ph*pw*C)
    # "B (T H W) (ph pw c) -> B c T (H ph) (W pw)"
    out = out.reshape(B, Tx, h, w, patch, patch, C).permute(0, 6, 1, 2, 4, 3, 5)
    return out.reshape(B, C, Tx, H, W)


@pytest.mark.parametrize("depth", [1, 2])
def test_official_state_dict_loads_and_matches_reference_forward(depth):
    heads, kv_heads, hd, channels, patch = 4, 2, 12, 4, 2
    dim = heads * hd
    official = _official_state_dict(dim, depth, heads, kv_heads, channels, patch, torch.Generator().manual_seed(1))
    model = LaVinDiTTransformer3DModel(
        in_channels=channels, num_layers=depth, num_attention_heads=heads, num_kv_heads=kv_heads,
        attention_head_dim=hd, patch_size=patch,
    )  # fmt: skip
    converted = convert_official_lavin_dit_state_dict(official, patch_size=patch, in_channels=channels)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    target, context, t = _inputs(channels=channels, t_c=3, size=8)
    with torch.no_grad():
        ours = model(target, context, t).sample
        reference = _official_forward(official, target, t, context, depth, heads, kv_heads, patch)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_official_conversion_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unexpected keys"):
        convert_official_lavin_dit_state_dict({"pos_embed": torch.zeros(1)})
