"""Loading CLIP weights: `build_clip` (every size inferred from a state dict) and `load_clip` (names and files).

What is here:
- `build_clip(state_dict)`: the architecture inferred from shapes and key names (OpenAI's `build_model` rules),
  loaded strictly; a tensor that disagrees is named with its shape;
- `load_clip(name_or_path)`: the official names (downloaded once with `torch.hub.download_url_to_file` and checked
  against the sha256 in OpenAI's URL; offline, the error says which file to put where), OpenAI TorchScript archives
  read by a restricted unpickler that rebuilds tensors and runs none of the archive's code, plain state dicts
  (weights-only), and safetensors files with OpenAI or Hugging Face key names (read without the package).
Deliberately not here: the model (clip.py), ResNet towers (a clear error), any other hub.
"""
import http.client
import io
import json
import logging
import math
import os
import pickle
import re
import struct
import sys
import urllib.error
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.hub

from clip import CLIP, QuickGELU
from files import CheckpointError, atomic_write, load_torch_file, sha256_file

log = logging.getLogger("dapt")

# ----------------------------------------------------------------------------------------------------------
# building a model from a state dict

NON_TENSOR_KEYS = ("input_resolution", "context_length", "vocab_size")  # extra entries of OpenAI archives


def _shape(sd, key, ndim):
    """sd[key]'s shape, checked to have `ndim` dimensions (a ValueError naming the tensor otherwise)."""
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"tensor {key!r} has shape {list(shape)}; a CLIP ViT has {ndim} dimension(s) there")
    return shape


def _agree(what, sizes):
    """The size that the tensors of `sizes` ({tensor name: (size, shape)}) imply; a ValueError naming the tensors
    that disagree with the others, with their shapes, otherwise."""
    values = [v for v, _ in sizes.values()]
    common = max(values, key=values.count)  # the majority (ties: the first tensor listed)
    odd = {k: s for k, (v, s) in sizes.items() if v != common}
    if odd:
        agree = ", ".join(f"{k} {list(s)}" for k, (v, s) in sizes.items() if v == common)
        bad = ", ".join(f"{k!r} has shape {list(s)}" for k, s in odd.items())
        raise ValueError(f"cannot infer the {what}: tensor {bad}, but {agree} imply {common}")
    return common


def infer_config(state_dict):
    """CLIP constructor arguments from shapes and key names (OpenAI's `build_model` rules). Each width is read
    from every tensor that holds it; a tensor that disagrees with the others is named with its shape."""
    sd = state_dict
    if "visual.proj" not in sd:
        if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in sd):
            raise ValueError("this is a ResNet CLIP checkpoint (visual.layer1 / visual.attnpool keys): "
                             "ResNet image towers are not supported; use ViT-B/16, ViT-B/32 or ViT-L/14")
        raise ValueError("not a CLIP ViT state dict: key 'visual.proj' is missing "
                         f"(first keys: {sorted(sd)[:5]})")
    for key in ("visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
                "token_embedding.weight", "ln_final.weight"):
        if key not in sd:
            raise ValueError(f"not a complete CLIP state dict: key {key!r} is missing")
    conv, vproj = _shape(sd, "visual.conv1.weight", 4), _shape(sd, "visual.proj", 2)
    vpos, tpos = _shape(sd, "visual.positional_embedding", 2), _shape(sd, "positional_embedding", 2)
    tok, lnf = _shape(sd, "token_embedding.weight", 2), _shape(sd, "ln_final.weight", 1)
    tproj = _shape(sd, "text_projection", 2)
    vision_width = _agree("image tower width", {"visual.conv1.weight": (conv[0], conv), "visual.positional_embedding":
                                                (vpos[1], vpos), "visual.proj": (vproj[0], vproj)})
    transformer_width = _agree("text tower width", {"token_embedding.weight": (tok[1], tok), "positional_embedding":
                                                    (tpos[1], tpos), "ln_final.weight": (lnf[0], lnf),
                                                    "text_projection": (tproj[0], tproj)})
    embed_dim = _agree("embedding width", {"text_projection": (tproj[1], tproj), "visual.proj": (vproj[1], vproj)})
    vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    vision_patch_size = conv[-1]
    grid = round((vpos[0] - 1) ** 0.5)
    return dict(
        embed_dim=embed_dim,
        image_resolution=vision_patch_size * grid,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=vision_patch_size,
        context_length=tpos[0],
        vocab_size=tok[0],
        transformer_width=transformer_width,
        transformer_heads=transformer_width // 64,
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    )


def build_clip(state_dict):
    """A CLIP whose every size comes from the state dict; loaded with strict=True, in float32, eval mode. A tensor
    whose shape differs from what the architecture (inferred from the others) needs is named with both shapes."""
    sd = {k: v for k, v in state_dict.items() if k not in NON_TENSOR_KEYS}
    config = infer_config(sd)
    model = CLIP(**config)
    expected = model.state_dict()
    wrong = [(k, list(v.shape), list(expected[k].shape)) for k, v in sd.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        listed = "; ".join(f"tensor {k!r} has shape {s}, expected {e}" for k, s, e in wrong[:5])
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise ValueError(f"{listed}{more} for the architecture the other tensors imply ({config})")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# loading checkpoints

# OpenAI's files: the URL path holds the file's sha256, checked after download and once per process when cached.
CLIP_URL = "https://openaipublic.azureedge.net/clip/models/{sha256}/{file}"


OFFICIAL = {  # name -> (sha256, file name)
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
}


FORMATS = ("an OpenAI TorchScript archive (.pt, read without running its code)",
           "a torch.save state dict (.pt, .pth, .bin; read with weights_only=True)",
           "a safetensors file (.safetensors) with OpenAI or Hugging Face CLIP key names")


SUPPORTED = f"a model name ({', '.join(OFFICIAL)}) or a path to " + "; ".join(FORMATS)


DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def load_clip(name_or_path, device="cpu", dtype=None, jit=False, trust=False, download_root=None):
    """A CLIP in eval mode from an official name or a checkpoint file, on `device`, weights cast to `dtype`.

    name_or_path: "ViT-B/16", "ViT-B/32", "ViT-L/14" (downloaded to download_root, default ~/.cache/clip,
    sha256 checked) or a path to one of FORMATS. dtype: None (float16 on CUDA, float32 elsewhere), a torch
    dtype or "fp16" / "bf16" / "fp32"; the whole model is cast (LayerNorm computes in float32 anyway).
    jit=True reads the file with torch.jit.load, which RUNS the archive's TorchScript code: allowed for the
    three official files (sha256) only, unless trust=True too. Every problem raises CheckpointError.
    """
    dtype = resolve_dtype(dtype, device)
    name, sha256 = str(name_or_path), None
    if name in OFFICIAL:
        path, sha256 = official_file(name, download_root)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder; expected {SUPPORTED}")
        if not path.is_file():
            raise CheckpointError(f"{name!r} is neither a known model name ({', '.join(OFFICIAL)}) nor an existing "
                                  f"file; expected {SUPPORTED}")
    if jit:
        state_dict, fmt = read_with_jit(path, sha256, trust), "TorchScript via torch.jit.load (its code ran)"
    else:
        state_dict, fmt = read_checkpoint(path)
    model = _build_checked(state_dict, path).to(device=device, dtype=dtype)
    log.info("CLIP weights %s: %s%s; config %s; dtype %s on %s", path, fmt,
             f", sha256 {sha256} verified" if sha256 else "", model.config, dtype, device)
    return model


def resolve_dtype(dtype, device):
    if dtype is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype!r}: expected None, torch.float16 / bfloat16 / float32 or one of {list(DTYPES)}")
    return dtype


def _build_checked(state_dict, path):
    """build_clip (strict key and shape match) with the file named in errors, then check what can be checked.
    Non-finite weights (NaN / inf) are refused: a model built from them gives chance-level results silently."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        counts = ", ".join(f"{k} ({int((~torch.isfinite(state_dict[k])).sum())} of {state_dict[k].numel()} values)"
                           for k in bad[:5])
        raise CheckpointError(f"{path}: non-finite weights (NaN or inf) in tensor(s) {counts}"
                              f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}; the file is damaged: "
                              "download or export it again")
    try:
        model = build_clip(state_dict)
    except (ValueError, RuntimeError) as e:  # infer_config's message, or load_state_dict's missing/unexpected keys
        raise CheckpointError(f"{path}: {e}") from e
    blocks = [*model.transformer.resblocks, *model.visual.transformer.resblocks]
    if not all(type(b.mlp.gelu) is QuickGELU for b in blocks):  # OpenAI weights were trained with QuickGELU
        raise RuntimeError("CLIP blocks must use QuickGELU")
    if set(model.state_dict()) != set(state_dict):
        raise RuntimeError(f"{path}: keys did not match the model strictly")
    return model


def read_checkpoint(path):
    """(state dict with OpenAI key names, format description) of a checkpoint file; runs no code from it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd, fmt = read_safetensors(path), "safetensors"
    elif suffix in (".pt", ".pth", ".bin"):
        if is_torchscript(path):
            sd = _clip_tensors(openai_state_dict(read_torchscript(path), path), path)
            fmt = "TorchScript archive (restricted reader, no code run)"
        else:
            sd, fmt = _torch_load(path), "torch.save state dict (weights_only=True)"
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix or '(no extension)'!r}; expected {SUPPORTED}")
    return openai_state_dict(sd, path), fmt


def _clip_tensors(sd, path):
    """A TorchScript module tree holds every tensor attribute, not only the state dict: keep CLIP's keys (missing
    ones are still an error later) and warn about the others."""
    try:
        config = infer_config(sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    with torch.device("meta"):  # key names only: no memory, no initialisation cost
        keys = set(CLIP(**config).state_dict())
    other = sorted(set(sd) - keys)
    if other:
        log.warning("%s: ignored tensors of the TorchScript module tree that are not CLIP weights: %s", path, other)
    return {k: v for k, v in sd.items() if k in keys}


def _torch_load(path):
    return load_torch_file(path, expected=SUPPORTED, refused="expected a state dict of tensors, e.g. "
                                                            "torch.save(model.state_dict(), path)")


def openai_state_dict(obj, path="<state dict>"):
    """A state dict with OpenAI's key names: unwrap a 'state_dict' / 'model' / 'module' container, strip a
    'module.' prefix, convert Hugging Face names, drop OpenAI's extra entries (NON_TENSOR_KEYS, attn_mask)."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in ("state_dict", "model", "module") if isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        what = f"dict with keys {list(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor, possibly under 'state_dict', 'model' "
                              f"or 'module'), found a {what}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        sd = hf_to_openai(sd, path)
    extra = [k for k in sd if k.rpartition(".")[2] in (*NON_TENSOR_KEYS, "attn_mask")]  # OpenAI's, never weights
    sd = {k: v for k, v in sd.items() if k not in extra}
    if extra:
        log.debug("%s: dropped entries that are not CLIP weights: %s", path, extra)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}; expected a state dict of tensors")
    return sd


# Hugging Face transformers CLIPModel names -> OpenAI names. Per block: q/k/v_proj are concatenated into in_proj.
_HF_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


_HF_MODULES = {"text_model.embeddings.token_embedding": "token_embedding", "text_model.final_layer_norm": "ln_final",
               "vision_model.embeddings.patch_embedding": "visual.conv1",
               "vision_model.pre_layrnorm": "visual.ln_pre",  # (sic) in transformers
               "vision_model.post_layernorm": "visual.ln_post"}


_HF_TENSORS = {  # name -> (OpenAI name, transposed): the projections are nn.Linear weights [E, width] there
    "text_model.embeddings.position_embedding.weight": ("positional_embedding", False),
    "vision_model.embeddings.position_embedding.weight": ("visual.positional_embedding", False),
    "vision_model.embeddings.class_embedding": ("visual.class_embedding", False),
    "visual_projection.weight": ("visual.proj", True),
    "text_projection.weight": ("text_projection", True),
    "logit_scale": ("logit_scale", False),
}


def hf_to_openai(sd, path="<state dict>"):
    """Convert a Hugging Face transformers CLIP state dict; any key left unconverted is an error."""
    out, qkv, left = {}, {}, []
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):  # an index buffer, not a weight
            continue
        if k in _HF_TENSORS:
            name, transposed = _HF_TENSORS[k]
            out[name] = v.t() if transposed else v
            continue
        m = re.fullmatch(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        base, _, leaf = k.rpartition(".")
        if m:
            block = ("transformer" if m[1] == "text" else "visual.transformer") + f".resblocks.{m[2]}"
            if m[3] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{block}.attn.in_proj_{m[4]}", {})[m[3][len("self_attn.")]] = v
                continue
            if m[3] in _HF_BLOCK:
                out[f"{block}.{_HF_BLOCK[m[3]]}.{m[4]}"] = v
                continue
        elif base in _HF_MODULES and leaf in ("weight", "bias"):
            out[f"{_HF_MODULES[base]}.{leaf}"] = v
            continue
        left.append(k)
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            left.append(f"{name} (only {'/'.join(sorted(parts))} of q/k/v)")
        else:
            out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])  # OpenAI's packed order: q, k, v
    if left:
        raise CheckpointError(f"{path}: Hugging Face CLIP keys with no OpenAI equivalent: {left[:10]}"
                              f"{f' and {len(left) - 10} more' if len(left) > 10 else ''}")
    return out


# safetensors, without the package: u64 little-endian header size, a JSON header {name: {"dtype", "shape",
# "data_offsets": [begin, end]}} (offsets into the data after the header; "__metadata__" ignored), raw data.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def write_safetensors(tensors, path, metadata=None):
    """name -> tensor as a .safetensors file (what read_safetensors and the safetensors package read), atomically; the
    data 8-byte aligned as the reference writer does; `metadata`: a {str: str} header entry."""
    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for c in chunks:
                f.write(c)
    atomic_write(path, write)
    return path


def read_safetensors(path):
    """name -> tensor of a .safetensors file (little-endian data, as every writer produces)."""
    path = Path(path)
    with open(path, "rb") as f:
        blob = f.read()

    def corrupt(why):
        return CheckpointError(f"{path}: not a valid safetensors file: {why}; expected an 8-byte little-endian "
                               "header size, a JSON header and the tensor data (truncated or corrupt download?)")

    if len(blob) < 8:
        raise corrupt(f"only {len(blob)} bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise corrupt(f"header size {n} but the file has {len(blob)} bytes")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError as e:  # JSON or UTF-8 error
        raise corrupt(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data, out = memoryview(blob)[8 + n :], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"entry {name!r} = {info!r} needs dtype (one of {', '.join(SAFETENSORS_DTYPES)}), "
                          "shape and data_offsets") from None
        numel = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(data) or end - begin != numel * dtype.itemsize:
            raise corrupt(f"entry {name!r}: data_offsets [{begin}, {end}] do not hold {info['dtype']} {shape} "
                          f"within the {len(data)} data bytes")
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


# TorchScript archives (OpenAI's .pt): a zip with <archive>/data.pkl (the pickled module tree), the raw tensor
# storages <archive>/data/<key>, code/ (TorchScript source) and constants.pkl. data.pkl is read by a restricted
# unpickler: it rebuilds tensors, stands in for every TorchScript class, and refuses every other global.
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


def is_torchscript(path):
    """True for a zip with TorchScript code: <archive>/code/ or <archive>/constants.pkl (torch.save has neither)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # torch.load reports it
    return any(n.partition("/")[2].startswith("code/") or n.partition("/")[2] == "constants.pkl" for n in names)


class TorchScriptObject:
    """Stands in for a TorchScript class (`__torch__.*`): keeps the pickled state and runs none of the archive's
    code (a TorchScript `__setstate__` lives in code/, which is never read)."""

    state = None

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2: a view of the storage (as_strided checks the bounds)."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"tensor without a storage: {storage!r}")
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _same(value, *args):
    return value


_SAFE_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor, ("collections", "OrderedDict"): OrderedDict,
                 # TorchScript's typed lists (torch/jit/_pickle.py): the value itself
                 **{("torch.jit._pickle", n): _same for n in ("restore_type_tag", "build_intlist", "build_tensorlist",
                                                              "build_doublelist", "build_boollist")}}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storage, path):
        super().__init__(file)
        self.storage, self.path, self.stubs = storage, path, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            return self.stubs.setdefault(key, type(key, (TorchScriptObject,), {}))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # a dtype: only ever read by persistent_load, not callable
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise CheckpointError(f"{self.path}: data.pkl asks for the global '{module}.{name}', which the restricted "
                              "reader refuses (it only rebuilds tensors); not a plain CLIP TorchScript archive. "
                              "If you trust the file, load_clip(..., jit=True, trust=True) runs it with torch.jit.load")

    def persistent_load(self, pid):  # ('storage', storage dtype, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self.storage(str(pid[2]), pid[1], int(pid[4]))


def read_torchscript(path):
    """Dotted name -> tensor of every tensor in a TorchScript archive's module tree, without running its code."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: expected one '<archive>/data.pkl' in the zip, found {sorted(pkl)}")
            prefix = pkl[0][: -len("data.pkl")]
            big_endian = prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() == b"big"
            storages = {}

            def storage(key, dtype, numel):
                if key not in storages:
                    name = f"{prefix}data/{key}"
                    if name not in names:
                        raise CheckpointError(f"{path}: storage {name} named in data.pkl is missing (truncated file?)")
                    raw = bytearray(z.read(name))  # z.read checks the CRC
                    if len(raw) != numel * dtype.itemsize:
                        raise CheckpointError(f"{path}: storage {name} has {len(raw)} bytes, expected {numel} x "
                                              f"{dtype} ({numel * dtype.itemsize} bytes)")
                    t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                    if big_endian:
                        t = t.view(-1, dtype.itemsize).flip(-1).reshape(-1)
                    storages[key] = t.view(dtype)
                return storages[key]

            root = _RestrictedUnpickler(io.BytesIO(z.read(pkl[0])), storage, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # bad zip, CRC error, malformed pickle, out-of-bounds tensor view, ...
        raise CheckpointError(f"{path}: corrupt or truncated TorchScript archive ({type(e).__name__}: {e}); "
                              f"expected {FORMATS[0]}") from e
    tensors, seen = {}, set()

    def walk(obj, name):  # module attribute paths = state-dict keys
        if isinstance(obj, torch.Tensor):
            tensors[name] = obj
        elif id(obj) in seen:
            return
        elif isinstance(obj, TorchScriptObject):
            seen.add(id(obj))
            walk(obj.state, name)
        elif isinstance(obj, (dict, list, tuple)):
            seen.add(id(obj))
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            for k, v in items:
                walk(v, f"{name}.{k}" if name else str(k))

    walk(root, "")
    return tensors


def read_with_jit(path, sha256=None, trust=False):
    """State dict of torch.jit.load(path): runs the archive's code, so only for official files or trust=True."""
    sha256 = sha256 or sha256_file(path)
    official = sha256 in {h for h, _ in OFFICIAL.values()}
    if not official and not trust:
        raise CheckpointError(f"{path}: jit=True runs the archive's code with torch.jit.load and is allowed only for "
                              f"the official OpenAI files; this file's sha256 {sha256} is not one of theirs. Either "
                              "drop jit=True (the default reader rebuilds the weights without running any code), or "
                              "pass trust=True as well if you trust where the file came from.")
    log.warning("torch.jit.load(%s) runs the archive's code (%s)", path, "official file" if official else "trust=True")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: torch.jit.load failed ({type(e).__name__}: {e}); jit=True needs a "
                              "TorchScript archive") from e
    return openai_state_dict(dict(module.state_dict()), path)


# ----------------------------------------------------------------------------------------------------------
# downloads

_VERIFIED = set()  # (path, size, mtime) of cached files whose sha256 was checked by this process


def official_file(name, download_root=None):
    """(path, sha256) of an official model file: downloaded if absent, a cached file verified once per process."""
    sha256, file = OFFICIAL[name]
    path = Path(download_root or "~/.cache/clip").expanduser() / file
    url = CLIP_URL.format(sha256=sha256, file=file)
    if not path.exists():
        download(url, path, sha256)
    elif _stamp(path) not in _VERIFIED:
        got = sha256_file(path)
        if got != sha256:
            raise CheckpointError(f"{path}: the cached file has sha256 {got}, but {name} ({url}) has {sha256}: it is "
                                  "corrupt or incomplete. Delete it and run again to download it anew.")
    _VERIFIED.add(_stamp(path))
    return path, sha256


def _stamp(path):
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def download(url, path, sha256):
    """Fetch url into path with torch.hub.download_url_to_file, which writes a temporary file beside it and moves it
    into place only once its sha256 starts with `sha256` (here: all of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {path.name} from {url}", file=sys.stderr, flush=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=sha256, progress=True)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise CheckpointError(f"could not download {url} ({getattr(e, 'reason', e)}). If this machine is offline, "
                              f"fetch that URL elsewhere and put the file at {path} (file {path.name} in folder "
                              f"{path.parent}); its sha256 must be {sha256}.") from e
    except RuntimeError as e:  # torch.hub: 'invalid hash value (expected "...", got "...")'
        got = re.search(r'got "([0-9a-f]+)"', str(e))
        raise CheckpointError(f"{url}: the downloaded file has sha256 {got[1] if got else '?'}, expected {sha256}; it "
                              f"was discarded and nothing was written to {path}. Try again, or fetch it yourself and "
                              "check it.") from None
