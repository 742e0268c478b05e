"""`gemmakit quantize`: Hugging Face folders written as GGUF files in llama.cpp's layout.

The GGUF written from a folder gives the same logits as the folder quantized while loading (Q8_0 = int8, Q4_1 =
int4: the same blocks), and as the float folder for F32; its tokenizer is the one llama.cpp would build (the
Gemma 4 vocabulary of tests/data/gemma4_tokenizer_golden.json, whose ids llama.cpp produced). Whether llama.cpp
itself loads these files and agrees is benchmarks/parity_gemma4_llamacpp.py's job (llama.cpp stays out of CI).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import gemmakit
from gemmakit import cli
from gemmakit.convert import quantize_folder
from gemmakit.errors import CorruptFileError, InvalidParameterError, UnsupportedModelError
from gemmakit.weights.gguf import GGUFFile
from helpers import tiny_vocab
from test_families import build, gemma3, gemma4

GOLDEN = json.loads((Path(__file__).parent / "data" / "gemma4_tokenizer_golden.json").read_text())
SPECIAL_HEAD = 17  # the golden vocabulary's control and marker pieces come first


def write_gemma4_tokenizer(folder: Path) -> None:
    """The golden Gemma 4-shaped vocabulary as a Hugging Face tokenizer.json (BPE, byte fallback, U+2581 for
    spaces), its control and marker pieces as special added tokens, as Gemma 4 checkpoints ship them."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    pieces = GOLDEN["pieces"]
    merges = [tuple(m.split(" ")) for m in GOLDEN["merges"]]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in pieces[:SPECIAL_HEAD]])
    tok.save(str(folder / "tokenizer.json"))


def write_sentencepiece_model(folder: Path) -> tuple[list[str], list[float], list[int]]:
    """tests/helpers.py's small SentencePiece vocabulary as a tokenizer.model file."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    pieces, scores, types = tiny_vocab()
    proto = sp_pb2.ModelProto()
    for piece, score, kind in zip(pieces, scores, types):
        proto.pieces.add(piece=piece, score=score, type=kind)
    proto.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    return pieces, scores, types


def _vocab_sized(factory, size: int):
    def make():
        config = factory()
        config.vocab_size = size
        if getattr(config, "vocab_size_per_layer_input", None):
            config.vocab_size_per_layer_input = size
        if getattr(config, "hidden_size_per_layer_input", 0):
            config.hidden_size_per_layer_input = 32  # whole 32-blocks: the PLE matrices quantize too
        if getattr(config, "enable_moe_block", False):
            config.moe_intermediate_size = 32  # and the experts' down projections
        return config
    return make


def _gemma4_folder(tmp_path_factory, kind: str):
    root = tmp_path_factory.mktemp(kind)
    _, ref, llm, _ = build(f"gemma4_{kind}", root / "hf", factory=_vocab_sized(lambda: gemma4(kind), len(GOLDEN["pieces"])))
    write_gemma4_tokenizer(root / "hf")
    ids = torch.randint(0, len(GOLDEN["pieces"]), (40,), generator=torch.Generator().manual_seed(1)).tolist()
    return root, ids


@pytest.fixture(scope="module")
def e2b(tmp_path_factory):
    return _gemma4_folder(tmp_path_factory, "e2b")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_block_bytes_are_gguf_pys(qtype) -> None:
    """The PyTorch block writers against gguf-py's quantizers (llama.cpp's reference, in numpy), byte for byte."""
    from gguf import GGMLQuantizationType, quants

    from gemmakit.quant.convert import BYTE_PACKERS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 128, generator=g) * torch.logspace(-5, 2, 48).unsqueeze(1)
    x[2, :32] = 0.0
    x[3, 32:64] = -0.5
    ours = BYTE_PACKERS[qtype](x).numpy().reshape(-1)
    theirs = quants.quantize(x.numpy(), GGMLQuantizationType[qtype]).reshape(-1)
    assert ours.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("qtype,quant", [("Q8_0", "int8"), ("Q4_1", "int4")])
@torch.inference_mode()
def test_quantized_gguf_equals_quantize_at_load(e2b, qtype, quant) -> None:
    root, ids = e2b
    path = root / f"model-{qtype}.gguf"
    assert cli.main(["quantize", str(root / "hf"), "-o", str(path), "--type", qtype]) == 0
    from_file = gemmakit.load(path)
    at_load = gemmakit.load(root / "hf", quant=quant)
    assert from_file.model.decode_path == at_load.model.decode_path == "C layer loop"
    assert torch.equal(from_file.logits(ids), at_load.logits(ids))
    meta = GGUFFile(path).metadata
    assert meta["general.architecture"] == "gemma4" and meta["general.file_type"] == {"Q8_0": 7, "Q4_1": 3}[qtype]
    types = {name: info.ggml_type.name for name, info in GGUFFile(path).tensors.items()}
    assert types["blk.0.attn_q.weight"] == qtype and types["per_layer_token_embd.weight"] == qtype
    assert types["blk.0.attn_norm.weight"] == "F32" and types["rope_freqs.weight"] == "F32"
    assert not list(root.glob("*.partial"))


def test_gemma4_tokenizer_is_llamacpps(e2b) -> None:
    """The tokenizer.json's pieces, merges and piece types become the vocabulary llama.cpp encoded the golden
    texts with, and the file encodes them to llama.cpp's ids."""
    root, _ = e2b
    path = root / "vocab-check.gguf"
    quantize_folder(root / "hf", path, "Q8_0")
    meta = GGUFFile(path).metadata
    assert meta["tokenizer.ggml.model"] == "gemma4"
    assert list(meta["tokenizer.ggml.tokens"]) == GOLDEN["pieces"]
    assert [int(t) for t in meta["tokenizer.ggml.token_type"]] == GOLDEN["types"]
    assert list(meta["tokenizer.ggml.merges"]) == GOLDEN["merges"]
    tok = gemmakit.load(path).tokenizer
    for case in GOLDEN["cases"][:40]:
        assert tok.encode(case["text"], parse_special=True) == case["ids_special"]


@torch.inference_mode()
def test_moe_experts_and_router(tmp_path_factory) -> None:
    """26B-A4B-like: expert stacks quantized row by row, the router kept float32 (as llama.cpp keeps
    ffn_gate_inp), and the same logits as the folder quantized while loading."""
    root, ids = _gemma4_folder(tmp_path_factory, "26b")
    path = root / "moe.gguf"
    quantize_folder(root / "hf", path, "Q8_0")
    types = {name: info.ggml_type.name for name, info in GGUFFile(path).tensors.items()}
    assert types["blk.0.ffn_gate_up_exps.weight"] == "Q8_0" and types["blk.0.ffn_down_exps.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert "blk.5.attn_v.weight" not in types  # K = V on the global layer
    assert torch.equal(gemmakit.load(path).logits(ids), gemmakit.load(root / "hf", quant="int8").logits(ids))


@pytest.fixture(scope="module")
def gemma3_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("g3")
    pieces, _, _ = tiny_vocab()
    _, _, llm, _ = build("gemma3", root / "hf", factory=_vocab_sized(lambda: gemma3(False), len(pieces)))
    write_sentencepiece_model(root / "hf")
    (root / "hf" / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.5,
                                                                  "top_k": 40, "top_p": 0.9}))
    ids = torch.randint(0, len(pieces), (30,), generator=torch.Generator().manual_seed(2)).tolist()
    return root, llm, ids


@torch.inference_mode()
def test_gemma3_f32_equals_the_float_folder(gemma3_folder) -> None:
    """Norms shifted to 1 + w as llama.cpp's converter writes them; the SentencePiece vocabulary carried over."""
    root, llm, ids = gemma3_folder
    path = root / "f32.gguf"
    quantize_folder(root / "hf", path, "F32")
    loaded = gemmakit.load(path)
    assert (loaded.logits(ids) - llm.logits(ids)).abs().max().item() <= 1e-5
    # generation_config.json's recommended sampling travels as llama.cpp's general.sampling.* keys
    recommended = loaded.sampling_defaults
    assert (recommended.temperature, recommended.top_k, recommended.top_p) == (0.5, 40, pytest.approx(0.9))
    assert GGUFFile(path).metadata["general.sampling.top_k"] == 40
    pieces, scores, types = tiny_vocab()
    meta = GGUFFile(path).metadata
    assert meta["tokenizer.ggml.model"] == "llama" and list(meta["tokenizer.ggml.tokens"]) == pieces
    assert [float(s) for s in meta["tokenizer.ggml.scores"]] == scores
    assert [int(t) for t in meta["tokenizer.ggml.token_type"]] == types


def test_settings_llamacpp_cannot_express_are_refused(tmp_path) -> None:
    """llama.cpp hard-codes Gemma 3's local RoPE base (10,000): a checkpoint with another one is refused, not
    written as a file that would run a different model."""
    pieces, _, _ = tiny_vocab()

    def other_local_base():
        config = _vocab_sized(lambda: gemma3(False), len(pieces))()
        config.rope_parameters["sliding_attention"]["rope_theta"] = 20_000.0
        return config
    build("gemma3", tmp_path / "hf", factory=other_local_base)
    write_sentencepiece_model(tmp_path / "hf")
    with pytest.raises(UnsupportedModelError, match="rope_local_base_freq = 20000.0 cannot be written"):
        quantize_folder(tmp_path / "hf", tmp_path / "x.gguf", "Q8_0")
    assert not list(tmp_path.glob("x.gguf*"))


def test_bad_requests_are_named_and_leave_no_file(gemma3_folder, tmp_path, monkeypatch, capsys) -> None:
    root, _, _ = gemma3_folder
    with pytest.raises(InvalidParameterError, match="type 'Q9_9'"):
        quantize_folder(root / "hf", tmp_path / "a.gguf", "Q9_9")
    with pytest.raises(InvalidParameterError, match="its folder does not exist"):
        quantize_folder(root / "hf", tmp_path / "nowhere" / "a.gguf", "Q8_0")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a machine without llama-cpp-python
    with pytest.raises(InvalidParameterError, match="install llama-cpp-python"):
        quantize_folder(root / "hf", tmp_path / "a.gguf", "Q4_K_M")
    no_tokenizer = tmp_path / "bare"
    build("gemma3", no_tokenizer, factory=_vocab_sized(lambda: gemma3(False), 300))
    assert cli.main(["quantize", str(no_tokenizer), "-o", str(tmp_path / "a.gguf")]) == 2
    assert "no tokenizer.model" in capsys.readouterr().err
    cut = tmp_path / "cut"
    build("gemma3", cut, factory=_vocab_sized(lambda: gemma3(False), len(tiny_vocab()[0])))
    write_sentencepiece_model(cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CorruptFileError):
        quantize_folder(cut, tmp_path / "a.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "cut"]


def test_keys_round_trip_a_gemma4_without_global_layers() -> None:
    """A Gemma 4 cut to its first (sliding) layers, as benchmarks/gemma4_shapes.py cuts the 26B-A4B: its keys
    read back to the same configuration (reading such a file used to fail on the missing global KV-head count)."""
    from gemmakit.config import SLIDING, config_from_hf
    from gemmakit.convert.metadata import architecture_keys, check_round_trip

    hf = gemma4("26b").to_dict()
    hf |= {"num_hidden_layers": 4, "layer_types": [SLIDING] * 4}
    config = config_from_hf(hf)
    keys = architecture_keys(config) | {"general.architecture": "gemma4", "tokenizer.ggml.tokens": ["x"] * 300}
    check_round_trip(config, keys, {f"blk.{i}.attn_k.weight" for i in range(4)}, "cut")
