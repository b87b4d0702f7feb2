"""Writes NVIDIA stylegan2-ada-pytorch network pickles for tests, without NVIDIA's code, and computes what such a
network outputs with NVIDIA's semantics (float64, written from the format description, independent of our ops).

The pickles have the structure and globals of a genuine snapshot: ``{'G', 'D', 'G_ema', 'training_set_kwargs',
'augment_pipe'}``, each network ``REDUCE(torch_utils.persistence._reconstruct_persistent_obj, (meta,))`` with
``meta = {type, version, module_src, class_name, state}``, ``dnnlib.util.EasyDict`` kwargs, numpy scalar
attributes (``weight_gain``), Parameters and buffers pickled by torch itself. Global names are chosen per file
(numpy-1 or numpy-2 scalar module); any other (malicious) global can be written by name without existing here.
"""
from __future__ import annotations

import collections
import math
import pickle
import types

import numpy as np
import torch
import torch.nn.functional as F


def _standin(module: str, name: str):
    """A callable that pickles as the global ``module.name`` (never called: the loader must refuse or replace it)."""
    def fn(*args):
        raise AssertionError(f"stand-in for {module}.{name} was called")
    fn.global_name = (module, name)
    return fn


RECONSTRUCT = _standin("torch_utils.persistence", "_reconstruct_persistent_obj")


class EasyDict(dict):
    global_name = ("dnnlib.util", "EasyDict")


class Persistent:
    """Pickles as NVIDIA's persistent object; ``module_src`` is what NVIDIA's loader would execute."""

    def __init__(self, class_name: str, state: dict, module_src: str = "# training/networks.py source\n"):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        return RECONSTRUCT, (dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name,
                                  state=self.state),)


class Call:
    """Pickles as ``REDUCE(module.name, args)``: how a malicious file calls an arbitrary global."""

    def __init__(self, module: str, name: str, *args):
        self.fn, self.args = _standin(module, name), args

    def __reduce__(self):
        return self.fn, self.args


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us name globals freely
    dispatch = {**pickle._Pickler.dispatch, types.FunctionType: lambda self, obj: self.save_global(obj)}

    def __init__(self, f, protocol: int, numpy_module: str):
        super().__init__(f, protocol)
        self.numpy_module = numpy_module

    def save_global(self, obj, name=None):
        target = getattr(obj, "global_name", None)
        if target is None and getattr(obj, "__name__", None) == "scalar" and "multiarray" in str(obj.__module__):
            target = (self.numpy_module, "scalar")
        if target is None:
            return super().save_global(obj, name)
        module, name = target
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def dump(obj, path, protocol: int = 4, numpy_module: str = "numpy._core.multiarray") -> None:
    with open(path, "wb") as f:
        _Pickler(f, protocol, numpy_module).dump(obj)


# ---- a Generator's weights as NVIDIA's module tree ------------------------------------------------------------
FIR = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64


def _module(class_name, container, params=None, buffers=None, modules=None, **attrs):
    P = container
    state = {"training": False, "_parameters": P(params or {}), "_buffers": P(buffers or {}),
             "_non_persistent_buffers_set": set(), "_backward_hooks": collections.OrderedDict(),
             "_forward_hooks": collections.OrderedDict(), "_forward_pre_hooks": collections.OrderedDict(),
             "_state_dict_hooks": collections.OrderedDict(), "_load_state_dict_pre_hooks": collections.OrderedDict(),
             "_modules": P(modules or {}), **attrs}
    return state


def _param(t):
    return torch.nn.Parameter(t.detach().clone(), requires_grad=False)


def nvidia_tree(g, conv_clamp=None, container=dict, channels_last_res=(), c_dim=0, architecture="skip",
                stylegan3=False, module_src="# training/networks.py source\n"):
    """NVIDIA's ``Generator`` object tree holding the weights of our rosinality-layout ``g`` (float32)."""
    sd = {k: v.float() for k, v in g.state_dict().items()}
    wd = g.style_dim
    P = lambda cls, **kw: Persistent(cls, _module(cls, container, **kw), module_src)  # noqa: E731

    def fc(w, b, lr, act):
        return P("FullyConnectedLayer", params={"weight": _param(w), "bias": _param(b)}, activation=act,
                 weight_gain=np.float64(lr / math.sqrt(w.shape[1])), bias_gain=lr)

    def layer(src, res, up, noise, clamp, cl):
        w = sd[f"{src}.conv.weight"][0]
        return P("SynthesisLayer", params={"weight": _param(w.to(memory_format=torch.channels_last) if cl else w),
                                          "noise_strength": _param(sd[f"{src}.noise.weight"].reshape(())),
                                          "bias": _param(sd[f"{src}.activate.bias"])},
                 buffers={"resample_filter": FIR.clone(), "noise_const": sd[f"noises.noise_{noise}"][0, 0].clone()},
                 modules={"affine": fc(sd[f"{src}.conv.modulation.weight"], sd[f"{src}.conv.modulation.bias"], 1,
                                       "linear")},
                 resolution=res, up=up, use_noise=True, activation="lrelu", conv_clamp=clamp, padding=1,
                 act_gain=np.float64(math.sqrt(2)))

    def torgb(src, clamp, cl):
        w = sd[f"{src}.conv.weight"][0]
        return P("ToRGBLayer", params={"weight": _param(w.to(memory_format=torch.channels_last) if cl else w),
                                      "bias": _param(sd[f"{src}.bias"].reshape(3))},
                 modules={"affine": fc(sd[f"{src}.conv.modulation.weight"], sd[f"{src}.conv.modulation.bias"], 1,
                                       "linear")},
                 conv_clamp=clamp, weight_gain=np.float64(1 / math.sqrt(w.shape[1])))

    blocks, res_list = {}, [2**i for i in range(2, g.log_size + 1)]
    for j, r in enumerate(res_list):
        cl = r in channels_last_res
        mods, params = {}, {}
        if r == 4:
            params["const"] = _param(sd["input.input"][0])
            mods["conv1"], mods["torgb"] = layer("conv1", 4, 1, 0, conv_clamp, cl), torgb("to_rgb1", conv_clamp, cl)
        else:
            mods["conv0"] = layer(f"convs.{2 * j - 2}", r, 2, 2 * j - 1, conv_clamp, cl)
            mods["conv1"] = layer(f"convs.{2 * j - 1}", r, 1, 2 * j, conv_clamp, cl)
            mods["torgb"] = torgb(f"to_rgbs.{j - 1}", conv_clamp, cl)
        blocks[f"b{r}"] = P("SynthesisBlock", params=params, buffers={"resample_filter": FIR.clone()}, modules=mods,
                            in_channels=0 if r == 4 else g.channels[r // 2], w_dim=wd, resolution=r, img_channels=3,
                            is_last=r == g.size, architecture=architecture, use_fp16=cl, channels_last=cl,
                            num_conv=1 if r == 4 else 2, num_torgb=1)
    if stylegan3:
        blocks["input"] = P("SynthesisInput", buffers={"freqs": torch.randn(8, 2)})
    synthesis = P("SynthesisNetwork", modules=blocks, w_dim=wd, img_resolution=g.size, img_resolution_log2=g.log_size,
                  img_channels=3, block_resolutions=res_list, num_ws=g.n_latent)
    fcs = {f"fc{i}": fc(sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"], g.lr_mlp, "lrelu")
           for i in range(g.n_mlp)}
    if c_dim:
        fcs["embed"] = fc(torch.randn(wd, c_dim), torch.zeros(wd), 1, "linear")
    mapping = P("MappingNetwork", buffers={"w_avg": g.latent_avg.detach().float().clone()}, modules=fcs, z_dim=wd,
                c_dim=c_dim, w_dim=wd, num_ws=g.n_latent, num_layers=g.n_mlp, w_avg_beta=0.995)
    kwargs = EasyDict(z_dim=wd, c_dim=c_dim, w_dim=wd, img_resolution=g.size, img_channels=3,
                      mapping_kwargs=EasyDict(num_layers=g.n_mlp, lr_multiplier=g.lr_mlp),
                      synthesis_kwargs=EasyDict(channel_base=2048, channel_max=32, conv_clamp=conv_clamp,
                                                architecture=architecture, num_fp16_res=len(channels_last_res)))
    return P("Generator", modules={"synthesis": synthesis, "mapping": mapping}, z_dim=wd, c_dim=c_dim, w_dim=wd,
             img_resolution=g.size, img_channels=3, num_ws=g.n_latent, _init_args=(), _init_kwargs=kwargs)


def snapshot(G_ema, G=None, **extra):
    """The top-level dict as NVIDIA's training loop writes it."""
    return dict(training_set_kwargs=dict(EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                  path="/data/ffhq.zip", use_labels=False, max_size=70000,
                                                  xflip=False, resolution=32)),
                G=G if G is not None else G_ema, D=None, G_ema=G_ema, augment_pipe=None, **extra)


# ---- NVIDIA's forward semantics in float64, from the NVIDIA-named tensors --------------------------------------
def _upfirdn_up2(x, pad0, pad1):
    """Zero-insertion ×2, zero padding (pad0, pad1), the [1,3,3,1] FIR times 4 (true convolution: it is symmetric)."""
    b, c, h, w = x.shape
    up = x.new_zeros(b, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    up = F.pad(up, (pad0, pad1, pad0, pad1))
    return F.conv2d(up, (4 * FIR).to(x).expand(c, 1, 4, 4), groups=c)


def nvidia_mapping(t: dict, z: torch.Tensor, lr_mlp: float = 0.01) -> torch.Tensor:
    """w for z [B, z_dim], float64: 2nd-moment normalisation, then fc layers (lr-multiplied gains), lrelu·√2."""
    t = {k: v.double() for k, v in t.items()}
    x = z.double() * (z.double().square().mean(1, keepdim=True) + 1e-8).rsqrt()
    i = 0
    while f"mapping.fc{i}.weight" in t:
        w, b = t[f"mapping.fc{i}.weight"], t[f"mapping.fc{i}.bias"]
        x = F.leaky_relu(x @ (w * lr_mlp / math.sqrt(w.shape[1])).t() + b * lr_mlp, 0.2) * math.sqrt(2)
        i += 1
    return x


def nvidia_synthesis(t: dict, ws: torch.Tensor, conv_clamp=None, noise_mode="const") -> torch.Tensor:
    """Image for W+ ``ws`` [B, num_ws, w_dim], float64.

    Per-sample modulated weights W·s (toRGB: s·1/sqrt(Cin)), demodulated by (Σ(W·s)² + 1e-8)^-1/2; up-sampling
    layers: zero-insert, pad (3, 2), FIR, then a true 3×3 convolution (the generic up-then-convolve form);
    noise_const·strength ('const') or none; bias, lrelu·√2, clamp; toRGB: bias, clamp; skip: up-sampled
    (pad (2, 1)) and added.
    """
    t = {k: v.double() for k, v in t.items()}
    ws = ws.double()
    clamp = (lambda v: v) if conv_clamp is None else (lambda v: v.clamp(-conv_clamp, conv_clamp))  # noqa: E731

    def modconv(x, name, w, demod, up):
        weight = t[f"{name}.weight"]
        s = w @ (t[f"{name}.affine.weight"] / math.sqrt(w.shape[1])).t() + t[f"{name}.affine.bias"]
        if not demod:
            s = s / math.sqrt(weight.shape[1] * weight.shape[2] * weight.shape[3])
        per = weight[None] * s[:, None, :, None, None]
        if demod:
            per = per * (per.square().sum((2, 3, 4)) + 1e-8).rsqrt()[:, :, None, None, None]
        batch = x.shape[0]  # one grouped convolution: group b = sample b with its own weights
        x = _upfirdn_up2(x, 3, 2) if up else x
        per = per.flip([3, 4]) if up else per
        y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), per.reshape(-1, *per.shape[2:]), groups=batch,
                     padding=0 if up else weight.shape[-1] // 2)
        return y.reshape(batch, -1, *y.shape[2:])

    def synth_layer(x, name, w, up):
        y = modconv(x, name, w, True, up)
        if noise_mode == "const":
            y = y + t[f"{name}.noise_const"] * t[f"{name}.noise_strength"]
        return clamp(F.leaky_relu(y + t[f"{name}.bias"][None, :, None, None], 0.2) * math.sqrt(2))

    def rgb(x, name, w):
        return clamp(modconv(x, name, w, False, False) + t[f"{name}.bias"][None, :, None, None])

    res = sorted(int(k.split(".")[1][1:]) for k in t if k.startswith("synthesis.b") and k.endswith(".torgb.bias"))
    x = t["synthesis.b4.const"][None].expand(ws.shape[0], -1, -1, -1)
    x = synth_layer(x, "synthesis.b4.conv1", ws[:, 0], False)
    img = rgb(x, "synthesis.b4.torgb", ws[:, 1])
    idx = 1
    for r in res[1:]:
        x = synth_layer(x, f"synthesis.b{r}.conv0", ws[:, idx], True)
        x = synth_layer(x, f"synthesis.b{r}.conv1", ws[:, idx + 1], False)
        img = _upfirdn_up2(img, 2, 1) + rgb(x, f"synthesis.b{r}.torgb", ws[:, idx + 2])
        idx += 2
    return img


def tree_tensors(obj: Persistent, prefix: str = "") -> dict:
    """NVIDIA names -> tensors of a fixture tree (like ``state_dict``)."""
    out = {prefix + k: v for k, v in {**obj.state["_parameters"], **obj.state["_buffers"]}.items()}
    for name, sub in obj.state["_modules"].items():
        out.update(tree_tensors(sub, f"{prefix}{name}."))
    return out
