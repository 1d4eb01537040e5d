"""clip_load.load_clip and the checkpoint readers, offline: small random CLIPs written in every supported format.

Covers: plain / nested / prefixed torch.save state dicts, safetensors with OpenAI and Hugging Face names, a
TorchScript archive read without running its code (with proofs that its code never runs), jit=True gating,
downloads (sha256 check, cache, offline message) through file:// URLs or a fake urlopen, and every error.
"""
import hashlib
import os
import pickle
import re
import urllib.error
import warnings
import zipfile

import pytest
import torch

import clip_load
from conftest import clip_features, random_clip

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

@pytest.fixture(scope="module")
def model():
    return random_clip(seed=0)


def assert_same_features(a, b):
    for x, y in zip(clip_features(a), clip_features(b)):
        assert torch.equal(x, y)


# ---- plain state dicts


@pytest.mark.parametrize("name, wrap", [
    ("plain.pt", lambda sd: sd),
    ("nested.pth", lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}),
    ("model.bin", lambda sd: {"model": sd, "optimizer": {}}),
    ("open_clip_pytorch_model.bin", lambda sd: sd),
])
def test_torch_save_state_dicts(tmp_path, model, name, wrap):
    path = tmp_path / name
    torch.save(wrap(model.state_dict()), path)
    loaded = clip_load.load_clip(path)
    assert loaded.config == model.config and loaded.dtype == torch.float32 and not loaded.training
    assert_same_features(loaded, model)


def test_plain_torch_save_zip_does_not_go_through_the_torchscript_reader(tmp_path, model, monkeypatch):
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    assert zipfile.is_zipfile(path) and not clip_load.is_torchscript(path)

    def refuse(path):
        raise AssertionError("read_torchscript called for a torch.save file")

    monkeypatch.setattr(clip_load, "read_torchscript", refuse)
    assert_same_features(clip_load.load_clip(path), model)


@pytest.mark.parametrize("dtype, expected", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                             (torch.float32, torch.float32), (None, torch.float32)])
def test_dtype(tmp_path, model, dtype, expected):
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    loaded = clip_load.load_clip(path, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {expected}
    if expected == torch.bfloat16:  # runs on the CPU; LayerNorm in float32, so close to the float32 features
        for x, y in zip(clip_features(loaded), clip_features(model)):
            assert torch.allclose(x, y, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        clip_load.load_clip(path, dtype="int8")


def test_default_dtype_is_float16_on_cuda_float32_elsewhere():
    assert clip_load.resolve_dtype(None, "cuda") == clip_load.resolve_dtype("fp16", "cpu") == torch.float16
    assert clip_load.resolve_dtype(None, torch.device("cpu")) == clip_load.resolve_dtype("fp32", "cuda") == torch.float32
    assert clip_load.resolve_dtype("bf16", "cpu") == clip_load.resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16


# ---- safetensors


def test_safetensors_reader_and_writer_round_trip(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "f64": torch.randn(2).double(), "i64": torch.arange(6).view(2, 3), "i32": torch.arange(3).int(),
               "u8": torch.arange(7, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(4.5), "empty": torch.zeros(0, 3)}
    path = tmp_path / "t.safetensors"
    clip_load.write_safetensors(tensors, path, metadata={"format": "pt"})
    raw = path.read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0  # data aligned
    back = clip_load.read_safetensors(path)
    assert list(back) == list(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


def openai_to_hf(sd):
    """Inverse of the Hugging Face -> OpenAI mapping, written independently of clip.py (transformers' names)."""
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    top = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "positional_embedding": "text_model.embeddings.position_embedding.weight",
           "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
           "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
           "visual.class_embedding": "vision_model.embeddings.class_embedding",
           "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
           "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
           "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
           "visual.ln_post.weight": "vision_model.post_layernorm.weight",
           "visual.ln_post.bias": "vision_model.post_layernorm.bias", "logit_scale": "logit_scale"}
    hf = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", k)
        if m:
            layer = f"{'vision' if m[1] else 'text'}_model.encoder.layers.{m[2]}."
            if m[3] in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = m[3].rsplit("_", 1)[1]
                for name, part in zip("qkv", v.chunk(3)):
                    hf[f"{layer}self_attn.{name}_proj.{kind}"] = part.clone()
            else:
                module, leaf = m[3].rsplit(".", 1)
                hf[f"{layer}{block[module]}.{leaf}"] = v
        elif k == "visual.proj":
            hf["visual_projection.weight"] = v.t().contiguous()
        elif k == "text_projection":
            hf["text_projection.weight"] = v.t().contiguous()
        else:
            hf[top[k]] = v
    hf["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    hf["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    return hf


@pytest.mark.parametrize("hf_names", [False, True])
def test_safetensors_openai_and_hugging_face_names(tmp_path, model, hf_names):
    sd = model.state_dict()
    if hf_names:
        sd = openai_to_hf(sd)
        assert not any(k.startswith(("visual.", "transformer.")) for k in sd)
    path = tmp_path / ("model.safetensors" if hf_names else "open_clip_model.safetensors")
    clip_load.write_safetensors(sd, path)
    assert_same_features(clip_load.load_clip(path), model)


def test_hugging_face_key_without_equivalent_is_an_error(tmp_path, model):
    sd = openai_to_hf(model.state_dict())
    sd["vision_model.encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    del sd["text_model.encoder.layers.1.self_attn.v_proj.bias"]
    path = tmp_path / "hf.safetensors"
    clip_load.write_safetensors(sd, path)
    with pytest.raises(clip_load.CheckpointError, match=r"hf.safetensors.*no OpenAI equivalent") as e:
        clip_load.load_clip(path)
    assert "rotary.weight" in str(e.value) and "transformer.resblocks.1.attn.in_proj_bias" in str(e.value)


# ---- TorchScript archives


@pytest.fixture(scope="module")
def torchscript(tmp_path_factory, model):
    """(path, eager reference) of an OpenAI-like archive: a traced CLIP in float16 with OpenAI's extra entries
    (input_resolution, context_length, vocab_size, text attn_mask); names are module attribute paths."""
    m = random_clip(seed=0)
    del m.context_length  # a plain int attribute here; a tensor in OpenAI's archives
    for name, value in [("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)]:
        m.register_buffer(name, torch.tensor(value))
    for block in m.transformer.resblocks:
        block.register_buffer("attn_mask", torch.full((77, 77), float("-inf")).triu(1))
    images, tokens = torch.zeros(1, 3, 32, 32), torch.tensor([[49406, 320, 49407] + [0] * 74])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the data-dependent text cut
        traced = torch.jit.trace(m, (images, tokens), check_trace=False)
    traced.half()  # OpenAI's archives hold float16 weights
    path = tmp_path_factory.mktemp("ts") / "ViT-tiny.pt"
    traced.save(str(path))
    reference = random_clip(seed=0).half().float()
    return path, reference


def test_torchscript_archive_layout(torchscript):
    path, _ = torchscript
    names = zipfile.ZipFile(path).namelist()
    prefix = names[0].split("/")[0]
    assert f"{prefix}/data.pkl" in names and f"{prefix}/constants.pkl" in names
    assert any(n.startswith(f"{prefix}/code/") for n in names) and f"{prefix}/data/0" in names
    assert clip_load.is_torchscript(path)


def test_torchscript_restricted_reader_matches_eager_and_jit_load(torchscript, caplog):
    path, reference = torchscript
    raw = clip_load.read_torchscript(path)
    assert {"input_resolution", "context_length", "vocab_size", "transformer.resblocks.0.attn_mask"} <= set(raw)
    assert raw["visual.proj"].dtype == torch.float16
    with caplog.at_level("INFO", logger="dapt"):
        loaded = clip_load.load_clip(path)
    assert "TorchScript archive (restricted reader" in caplog.text and "ViT-tiny.pt" in caplog.text
    assert_same_features(loaded, reference)
    jit_loaded = clip_load.load_clip(path, jit=True, trust=True)
    assert all(torch.equal(a, b) for a, b in zip(jit_loaded.state_dict().values(), loaded.state_dict().values()))


def test_torchscript_tree_tensors_that_are_not_weights_are_ignored_with_a_warning(torchscript, monkeypatch, caplog):
    path, reference = torchscript
    read = clip_load.read_torchscript
    monkeypatch.setattr(clip_load, "read_torchscript", lambda p: {**read(p), "visual.transformer.cache": torch.zeros(2)})
    with caplog.at_level("WARNING", logger="dapt"):
        assert_same_features(clip_load.load_clip(path), reference)
    assert "not CLIP weights: ['visual.transformer.cache']" in caplog.text
    # a missing weight is still an error
    monkeypatch.setattr(clip_load, "read_torchscript", lambda p: {k: v for k, v in read(p).items() if k != "visual.proj"})
    with pytest.raises(clip_load.CheckpointError, match="ViT-tiny.pt: .*'visual.proj' is missing"):
        clip_load.load_clip(path)
    monkeypatch.setattr(clip_load, "read_torchscript", lambda p: {k: v for k, v in read(p).items() if "ln_2.bias" not in k})
    with pytest.raises(clip_load.CheckpointError, match=r"(?s)ViT-tiny.pt: .*Missing key.*resblocks.0.ln_2.bias"):
        clip_load.load_clip(path)


class Marked(torch.nn.Module):
    """A scripted module whose TorchScript __setstate__ (run by torch.jit.load) prints and writes a marker."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.marker = torch.zeros(3)

    def forward(self, x):
        return x * self.weight + self.marker

    @torch.jit.export
    def __getstate__(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "marker": self.marker}

    @torch.jit.export
    def __setstate__(self, state: dict[str, torch.Tensor]) -> None:
        print("TorchScript __setstate__ ran")
        self.weight = state["weight"]
        self.marker = torch.full_like(state["marker"], 7.0)
        self.training = False


def test_torchscript_code_never_runs_setstate(tmp_path, capfd):
    path = tmp_path / "marked.pt"
    torch.jit.script(Marked()).save(str(path))
    capfd.readouterr()
    assert torch.equal(torch.jit.load(str(path)).marker, torch.full((3,), 7.0))  # the code runs here...
    assert "__setstate__ ran" in capfd.readouterr().out
    tensors = clip_load.read_torchscript(path)  # ...and not here
    assert "__setstate__ ran" not in capfd.readouterr().out
    assert torch.equal(tensors["marker"], torch.zeros(3)) and torch.equal(tensors["weight"], torch.ones(3))


class Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def with_data_pkl(src, dst, data):
    """Copy the archive src to dst with data.pkl replaced by `data`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item, data if item.filename.endswith("/data.pkl") else zin.read(item.filename))


@pytest.mark.parametrize("kind", ["system", "exec"])
def test_torchscript_reader_refuses_other_globals(tmp_path, torchscript, kind):
    def payload(marker):
        if kind == "system":
            return Payload(os.system, f"touch {marker}")
        return Payload(exec, f"open({str(marker)!r}, 'w').close()")

    live = tmp_path / "live"  # the payload is real: plain pickle runs it
    pickle.loads(pickle.dumps(payload(live), protocol=2, fix_imports=False))
    assert live.exists()
    marker = tmp_path / "marker"
    data = pickle.dumps({"training": True, "x": [payload(marker)]}, protocol=2, fix_imports=False)
    assert (b"posix\nsystem" if kind == "system" else b"builtins\nexec") in data
    path = tmp_path / "evil.pt"
    with_data_pkl(torchscript[0], path, data)
    glob = "posix.system" if kind == "system" else "builtins.exec"
    with pytest.raises(clip_load.CheckpointError, match=f"evil.pt.*'{re.escape(glob)}'.*refuses"):
        clip_load.load_clip(path)
    assert not marker.exists()


def test_torchscript_missing_storage(tmp_path, torchscript):
    src = torchscript[0]
    path = tmp_path / "cut.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.infolist():
            if not item.filename.endswith("/data/3"):
                zout.writestr(item, zin.read(item.filename))
    with pytest.raises(clip_load.CheckpointError, match=r"cut.pt: storage .*data/3 .*missing"):
        clip_load.load_clip(path)


def test_jit_needs_official_hash_or_trust(tmp_path, torchscript, monkeypatch):
    path = torchscript[0]
    with pytest.raises(clip_load.CheckpointError, match="not one of theirs.*drop jit=True.*trust=True"):
        clip_load.load_clip(path, jit=True)
    assert_same_features(clip_load.load_clip(path, jit=True, trust=True), torchscript[1])
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(clip_load.OFFICIAL, "ViT-B/16", (sha, "ViT-B-16.pt"))  # now its hash is "official"
    assert_same_features(clip_load.load_clip(path, jit=True), torchscript[1])


# ---- official names: download, cache, sha256


def serve(tmp_path, sha, file, content, monkeypatch):
    """Put `content` where CLIP_URL (pointed at a local folder through file://) will find it."""
    (tmp_path / "server" / sha).mkdir(parents=True)
    (tmp_path / "server" / sha / file).write_bytes(content)
    monkeypatch.setattr(clip_load, "CLIP_URL", (tmp_path / "server").as_uri() + "/{sha256}/{file}")
    monkeypatch.setattr(clip_load, "_VERIFIED", set())


def test_download_verify_and_cache(tmp_path, model, monkeypatch, capfd):
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    content = (tmp_path / "weights.pt").read_bytes()
    sha = hashlib.sha256(content).hexdigest()
    monkeypatch.setitem(clip_load.OFFICIAL, "ViT-B/16", (sha, "ViT-B-16.pt"))
    serve(tmp_path, sha, "ViT-B-16.pt", content, monkeypatch)
    cache = tmp_path / "cache"
    assert_same_features(clip_load.load_clip("ViT-B/16", download_root=cache), model)
    assert "downloading ViT-B-16.pt" in capfd.readouterr().err and (cache / "ViT-B-16.pt").read_bytes() == content
    assert os.listdir(cache) == ["ViT-B-16.pt"]
    (tmp_path / "server" / sha / "ViT-B-16.pt").unlink()  # the cached file is used from now on
    assert_same_features(clip_load.load_clip("ViT-B/16", download_root=cache), model)
    with open(cache / "ViT-B-16.pt", "ab") as f:  # a damaged cache is re-verified and reported
        f.write(b"x")
    with pytest.raises(clip_load.CheckpointError, match=r"ViT-B-16.pt: the cached file has sha256 .*Delete it"):
        clip_load.load_clip("ViT-B/16", download_root=cache)


def test_download_sha256_mismatch_writes_nothing(tmp_path, monkeypatch):
    sha = clip_load.OFFICIAL["ViT-B/32"][0]
    serve(tmp_path, sha, "ViT-B-32.pt", b"not the real file", monkeypatch)
    cache = tmp_path / "cache"
    with pytest.raises(clip_load.CheckpointError, match=f"sha256 .* expected {sha}; it was discarded"):
        clip_load.load_clip("ViT-B/32", download_root=cache)
    assert not (cache / "ViT-B-32.pt").exists() and os.listdir(cache) == []


def test_offline_error_names_url_file_and_folder(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(torch.hub, "urlopen", offline)  # what torch.hub.download_url_to_file calls
    cache = tmp_path / "cache"
    sha = clip_load.OFFICIAL["ViT-L/14"][0]
    with pytest.raises(clip_load.CheckpointError) as e:
        clip_load.load_clip("ViT-L/14", download_root=cache)
    msg = str(e.value)
    assert f"https://openaipublic.azureedge.net/clip/models/{sha}/ViT-L-14.pt" in msg
    assert "Network is unreachable" in msg and str(cache / "ViT-L-14.pt") in msg and f"folder {cache}" in msg
    assert os.listdir(cache) == []


# ---- errors


class NotATensor:
    pass


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"'.*nope.pt' is neither a known model name \(ViT-B/16, ViT-B/32, ViT-L/14\).*safetensors"),
    ("unknown name", r"'ViT-H/14' is neither a known model name \(ViT-B/16, .*TorchScript"),
    ("folder", r"is a folder; expected"),
    ("unknown extension", r"w.ckpt: unknown checkpoint type '.ckpt'; expected .*\.pth.*safetensors"),
    ("truncated zip", r"trunc.pt: not a readable torch.save file, truncated or corrupt"),
    ("garbage", r"garbage.bin: not a readable torch.save file"),
    ("wrong pickle", r"obj.pt: torch.load\(weights_only=True\) refused it \(it holds the global .*NotATensor\)"),
    ("not a dict", r"list.pt: expected a state dict .* found a list"),
    ("not clip", r"other.pt: not a CLIP ViT state dict: key 'visual.proj' is missing"),
    ("header too long", r"big.safetensors: not a valid safetensors file: header size \d+ but the file has"),
    ("header not json", r"json.safetensors: not a valid safetensors file: header is not JSON"),
    ("bad offsets", r"offsets.safetensors: .*entry 'visual.proj': data_offsets \[0, 999999\] do not hold"),
    ("truncated data", r"cut.safetensors: .*do not hold F32"),
    ("bad dtype", r"dtype.safetensors: .*entry 'a' .* needs dtype \(one of F64, F32"),
])
def test_errors_name_the_file_and_what_was_expected(tmp_path, model, case, pattern):
    sd = model.state_dict()
    path = tmp_path / {"missing": "nope.pt", "unknown name": "x", "folder": "dir.pt", "unknown extension": "w.ckpt",
                       "truncated zip": "trunc.pt", "garbage": "garbage.bin", "wrong pickle": "obj.pt",
                       "not a dict": "list.pt", "not clip": "other.pt", "header too long": "big.safetensors",
                       "header not json": "json.safetensors", "bad offsets": "offsets.safetensors",
                       "truncated data": "cut.safetensors", "bad dtype": "dtype.safetensors"}[case]
    if case == "unknown name":
        path = "ViT-H/14"
    elif case == "folder":
        path.mkdir()
    elif case == "unknown extension":
        torch.save(sd, path)
    elif case == "truncated zip":
        torch.save(sd, tmp_path / "full.pt")
        path.write_bytes((tmp_path / "full.pt").read_bytes()[:100000])
    elif case == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif case == "wrong pickle":
        torch.save({"visual.proj": NotATensor()}, path)
    elif case == "not a dict":
        torch.save([torch.zeros(1)], path)
    elif case == "not clip":
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    elif case.endswith("safetensors") or path.suffix == ".safetensors":
        clip_load.write_safetensors({"visual.proj": sd["visual.proj"], "a": torch.zeros(2)}, path)
        raw = bytearray(path.read_bytes())
        n = int.from_bytes(raw[:8], "little")

        def edit_header(old, new):  # a well-formed file whose header says something else
            head = bytes(raw[8 : 8 + n]).replace(old, new)
            assert head != raw[8 : 8 + n]
            return len(head).to_bytes(8, "little") + head + raw[8 + n :]

        if case == "header too long":
            raw[:8] = (len(raw) + 1).to_bytes(8, "little")
        elif case == "header not json":
            raw[8:12] = b"\xff{[:"
        elif case == "bad offsets":
            raw = edit_header(b"[0, 16384]", b"[0, 999999]")
        elif case == "truncated data":
            raw = raw[:-20]
        elif case == "bad dtype":
            raw = edit_header(b'"F32", "shape": [2]', b'"C64", "shape": [2]')
        path.write_bytes(bytes(raw))
    with pytest.raises(clip_load.CheckpointError, match=pattern):
        clip_load.load_clip(path)


# ---- shapes that disagree, non-finite weights


@pytest.mark.parametrize("key, shape, pattern", [
    ("ln_final.weight", (32,), r"text tower width: tensor 'ln_final.weight' has shape \[32\], but "
                               r"token_embedding.weight \[49408, 64\].* imply 64"),
    ("ln_final.weight", (64, 1), r"tensor 'ln_final.weight' has shape \[64, 1\]; a CLIP ViT has 1 dimension"),
    ("visual.proj", (64, 32), r"embedding width: tensor 'visual.proj' has shape \[64, 32\], but text_projection "
                              r"\[64, 64\] imply 64"),
    ("transformer.resblocks.0.ln_1.bias", (48,), r"tensor 'transformer.resblocks.0.ln_1.bias' has shape \[48\], "
                                                 r"expected \[64\]"),
])
def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path, model, key, shape, pattern):
    sd = dict(model.state_dict(), **{key: torch.zeros(shape)})
    path = tmp_path / "wrong.pt"
    torch.save(sd, path)
    with pytest.raises(clip_load.CheckpointError, match="wrong.pt: .*" + pattern) as e:
        clip_load.load_clip(path)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, model, value):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["visual.transformer.resblocks.1.mlp.c_fc.weight"][3, :2] = value
    path = tmp_path / "nan.safetensors"
    clip_load.write_safetensors(sd, path)
    with pytest.raises(clip_load.CheckpointError, match=r"nan.safetensors: non-finite weights \(NaN or inf\) in "
                                                   r"tensor\(s\) visual.transformer.resblocks.1.mlp.c_fc.weight "
                                                   r"\(2 of 16384 values\)"):
        clip_load.load_clip(path)
