"""weightpack.hf: transformers and sentence-transformers models in and out of containers (offline)."""

import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing from a hub: every model here is local
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import safetensors.torch as st  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

import weightpack  # noqa: E402
from conftest import minilm_dir, sha256  # noqa: E402
from weightpack.hf import from_pretrained, save_pretrained, unpack  # noqa: E402

SENTENCES = ["The cat sits on the mat.", "Model weights compress well with a context model.",
             "A quick brown fox jumps over the lazy dog.", "Tensor-parallel loaders read one slice each."]


def tiny_llama(seed=0):
    """A randomly initialised Llama-style causal LM with tied embeddings: hidden 64, 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _files(folder):
    return {p.relative_to(folder).as_posix(): sha256(p) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))  # any tokenizer: its files are carried
    (d / "LICENSE").write_text("a license travels with the weights\n")
    save_pretrained(model, d / "packed", tokenizer=tok, files=[d / "LICENSE"], workers=1)
    save_pretrained(model, d / "lm.wpk", tokenizer=tok, files=[d / "LICENSE"], workers=1)
    model.save_pretrained(str(d / "plain"))
    tok.save_pretrained(str(d / "plain"))
    (d / "plain" / "LICENSE").write_text("a license travels with the weights\n")
    return model, d


def test_causal_lm_round_trip_keeps_logits_and_ties(llama):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model, d = llama
    ids = torch.tensor([[1, 5, 9, 77, 3, 100, 42]])
    with torch.no_grad():
        ref = model(ids).logits
    for packed, cls in [(d / "packed", AutoModelForCausalLM), (d / "lm.wpk", LlamaForCausalLM)]:
        m = from_pretrained(cls, packed)
        assert type(m) is LlamaForCausalLM and not m.training
        assert m.lm_head.weight is m.model.embed_tokens.weight  # shared storage restored
        assert m.lm_head.weight.device.type == "cpu" and not any(p.is_meta for p in m.parameters())
        with torch.no_grad():
            assert torch.equal(m(ids).logits, ref)
        assert m.weightpack_load_report == {"missing": [], "unexpected": []}
        assert m.generation_config.to_dict() == model.generation_config.to_dict()
    half = from_pretrained(AutoModelForCausalLM, d / "packed", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    # the base model alone (AutoModel): the checkpoint's "model." prefix is taken off
    from transformers import AutoModel

    base = from_pretrained(AutoModel, d / "packed")
    assert type(base).__name__ == "LlamaModel" and base.weightpack_load_report["missing"] == []
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)
    # the GPU path: the device decoder (here run on the CPU) fills the same parameters
    m = from_pretrained(AutoModelForCausalLM, d / "lm.wpk", decoder="device")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref)


def test_from_pretrained_writes_no_weights_to_disk(llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    import weightpack.hf as hf

    _, d = llama
    seen = []
    close = hf._Packed.close

    def recording(self):
        seen.append(self.names())
        close(self)

    monkeypatch.setattr(hf._Packed, "close", recording)
    from_pretrained(AutoModelForCausalLM, d / "lm.wpk")
    assert "config.json" in seen[0] and not any(n.endswith(".safetensors") for n in seen[0])


def test_packed_folder_unpacks_to_the_plain_folder(llama, tmp_path):
    _, d = llama
    assert (d / "packed" / "model.wpk").is_file() and (d / "packed" / "config.json").is_file()
    assert (d / "packed" / "tokenizer.json").is_file()
    assert not list((d / "packed").glob("*.safetensors"))
    out = unpack(d / "packed", tmp_path / "plain")
    assert _files(out) == _files(d / "plain")  # byte-identical, tokenizer and configs included
    out2 = unpack(d / "lm.wpk", tmp_path / "plain2")
    assert _files(out2) == _files(d / "plain")
    r = subprocess.run([sys.executable, "-m", "weightpack", "unpack", str(d / "packed"), "-o", str(tmp_path / "cli")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _files(tmp_path / "cli") == _files(d / "plain")


def test_save_model_parity_with_safetensors_for_a_tied_lm(llama, tmp_path):
    from weightpack.torch import load_model, save_model

    model, _ = llama
    save_model(model, tmp_path / "lm.wpk", workers=1)
    st.save_model(model, str(tmp_path / "ref.safetensors"))
    out = weightpack.unpack(tmp_path / "lm.wpk", tmp_path / "out.safetensors")
    assert sha256(out) == sha256(tmp_path / "ref.safetensors")
    fresh = tiny_llama(seed=1)
    assert load_model(fresh, tmp_path / "lm.wpk") == ([], [])
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.fixture(scope="module")
def minilm_st():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    return model, model.encode(SENTENCES, convert_to_tensor=True)


def test_minilm_lossless_embeddings_are_identical(minilm_st, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model, ref = minilm_st
    save_pretrained(model, tmp_path / "minilm.wpk", workers=1)
    m = from_pretrained(SentenceTransformer, tmp_path / "minilm.wpk")
    assert torch.equal(m.encode(SENTENCES, convert_to_tensor=True), ref)
    save_pretrained(model, tmp_path / "packed", workers=1)
    assert torch.equal(from_pretrained(SentenceTransformer, tmp_path / "packed").encode(SENTENCES, convert_to_tensor=True), ref)
    # the packed folder unpacks to what sentence-transformers writes, folders and files alike
    model.save_pretrained(str(tmp_path / "plain"))
    unpack(tmp_path / "packed", tmp_path / "unpacked")
    tree = lambda f: sorted(p.relative_to(f).as_posix() for p in f.rglob("*"))  # noqa: E731
    assert tree(tmp_path / "unpacked") == tree(tmp_path / "plain")
    assert _files(tmp_path / "unpacked") == _files(tmp_path / "plain")
    # the real folder packed as it is (config, tokenizer, modules carried) loads the same way
    weightpack.pack(minilm_dir(), tmp_path / "folder.wpk", workers=1)
    m = from_pretrained(SentenceTransformer, tmp_path / "folder.wpk")
    assert torch.equal(m.encode(SENTENCES, convert_to_tensor=True), ref)
    # and as a plain transformers model
    plain = AutoModel.from_pretrained(str(minilm_dir())).eval()
    packed = from_pretrained(AutoModel, tmp_path / "folder.wpk")
    batch = m.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(packed(**batch).last_hidden_state, plain(**batch).last_hidden_state)


# measured on these sentences: int8 0.9995, int4 0.949-0.966, q-tcq 0.976-0.983 (cosine to the original)
@pytest.mark.parametrize("recipe,floor", [("int8", 0.999), ("int4", 0.93), ("q-tcq", 0.96)])
def test_minilm_lossy_embeddings_cosine(minilm_st, tmp_path, recipe, floor):
    from sentence_transformers import SentenceTransformer

    _, ref = minilm_st
    weightpack.pack(minilm_dir(), tmp_path / "m.wpk", recipe=recipe)
    m = from_pretrained(SentenceTransformer, tmp_path / "m.wpk")
    cos = torch.nn.functional.cosine_similarity(m.encode(SENTENCES, convert_to_tensor=True), ref)
    print(f"{recipe}: embedding cosine to the original {[round(c, 5) for c in cos.tolist()]}")
    assert float(cos.min()) >= floor and float(cos.max()) < 1.0


def test_from_pretrained_without_config_says_what_is_missing(tmp_path):
    from transformers import AutoModel

    st.save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    weightpack.pack(tmp_path / "w.safetensors", tmp_path / "w.wpk", workers=1)
    with pytest.raises(weightpack.CheckpointError, match=r"no config\.json in the packed model \(files carried: none\)"):
        from_pretrained(AutoModel, tmp_path / "w.wpk")


def test_from_pretrained_strict_about_missing_weights(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    _, d = llama
    folder = tmp_path / "partial"
    folder.mkdir()
    full = st.load_file(str(d / "plain" / "model.safetensors"))
    dropped = "model.layers.1.mlp.down_proj.weight"
    st.save_file({k: v for k, v in full.items() if k != dropped}, str(folder / "model.safetensors"),
                 metadata={"format": "pt"})
    (folder / "config.json").write_bytes((d / "plain" / "config.json").read_bytes())
    weightpack.pack(folder, tmp_path / "partial.wpk", workers=1)
    with pytest.raises(weightpack.WeightpackError, match=f"no tensor for 1 parameter.*{dropped}"):
        from_pretrained(AutoModelForCausalLM, tmp_path / "partial.wpk")
    m = from_pretrained(AutoModelForCausalLM, tmp_path / "partial.wpk", strict=False)
    assert m.weightpack_load_report["missing"] == [dropped]
