"""The tiny embedded Qwen2-VL: build, generate, save/reload, determinism, loader errors, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alphadrive_ray.cli import main
from alphadrive_ray.errors import UserError
from alphadrive_ray.models.loading import ensure_model, load_model, load_processor, read_model_type
from alphadrive_ray.models.tiny import SPECIAL_TOKENS, TinySpec, build_tiny_qwen2vl, count_parameters
from tests.conftest import tiny_test_spec
from alphadrive_ray.prompts import chat_messages, planning_prompt


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphadrive_ray", *args], capture_output=True, text=True, timeout=300)


def state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_vl(tiny_vl_dir) -> Path:
    """The default tiny Qwen2-VL, seed 0 (built once per session in conftest.py; read-only here)."""
    return Path(tiny_vl_dir)


@pytest.fixture(scope="module")
def tiny_text(tiny_text_dir) -> Path:
    return Path(tiny_text_dir)


@pytest.fixture(scope="module")
def scene_image():
    """A rendered 96 px scene (the processor resizes it to 224 x 224)."""
    from alphadrive_ray.data.synth import Scene, render_scene

    scene = Scene(
        speed=8.4,
        navigation="turn left",
        num_lanes=2,
        ego_lane=1,
        intersection="near",
        light="red",
        lead_distance=None,
        pedestrian_distance=None,
        cones_distance=None,
    )
    return render_scene(scene, size=96, seed=0)


def vl_inputs(processor, image, speed=8.4, navigation="turn left"):
    messages = chat_messages(planning_prompt(speed, navigation), image)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, processor(text=[text], images=[image], return_tensors="pt")


def test_loads_with_the_standard_classes_and_generates(tiny_vl, scene_image):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(str(tiny_vl)).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_vl))
    _, inputs = vl_inputs(processor, scene_image)
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 1 and n_prompt < out.shape[1] <= n_prompt + 6
    assert isinstance(processor.tokenizer.decode(out[0, n_prompt:]), str)
    # the answer vocabulary round-trips through the tokenizer
    answer = "<think> The light is red. </think>\n<answer> STOP, STRAIGHT </answer>"
    assert processor.tokenizer.decode(processor.tokenizer(answer)["input_ids"]) == answer


def test_chat_template_renders_the_image_pads(tiny_vl, scene_image):
    processor = load_processor(tiny_vl)
    text, inputs = vl_inputs(processor, scene_image)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>You are an expert driving assistant."
    )
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # the processor expands the one pad into one token per 2x2 merged patch: 224 px / 14 = 16 -> 16 x 16 / 4 = 64
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = inputs["image_grid_thw"][0]
    assert grid.tolist() == [1, 16, 16]
    assert int((inputs["input_ids"][0] == pad_id).sum()) == int(grid.prod()) // 4 == 64


def test_special_tokens_are_single_tokens(tiny_vl):
    tokenizer = load_processor(tiny_vl).tokenizer
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tokenizer.unk_token_id not in ids
    for token in SPECIAL_TOKENS:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_same_logits_after_save_and_reload(tiny_vl, scene_image, tmp_path):
    model = load_model(tiny_vl)
    processor = load_processor(tiny_vl)
    _, inputs = vl_inputs(processor, scene_image)
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    reloaded = load_model(tmp_path / "copy")
    _, inputs_again = vl_inputs(load_processor(tmp_path / "copy"), scene_image)
    assert torch.equal(inputs["input_ids"], inputs_again["input_ids"])
    assert torch.equal(inputs["pixel_values"], inputs_again["pixel_values"])
    with torch.no_grad():
        after = reloaded(**inputs_again).logits
    assert before.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.equal(before, after)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    # the loader's init_tiny path builds the same model as build_tiny_qwen2vl for the same seed,
    # both pretraining stages included (a few steps each: determinism, not skill, is under test)
    spec = TinySpec(seed=0, vision_pretrain_steps=4, language_pretrain_steps=2)
    built = build_tiny_qwen2vl(tmp_path / "built", spec)
    again = ensure_model(tmp_path / "again", init_tiny=True, spec=spec)
    other = build_tiny_qwen2vl(tmp_path / "other", TinySpec(seed=1, vision_pretrain_steps=0, language_pretrain_steps=0))
    reference, same, different = state(built), state(again), state(other)
    assert reference.keys() == same.keys() == different.keys()
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert (built / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert (built / "config.json").read_text() == (again / "config.json").read_text()
    # the randomly initialised matrices change with the seed
    assert any(not torch.equal(reference[k], different[k]) for k in reference if reference[k].dim() == 2)


def test_vision_pretraining_teaches_the_tower_and_leaves_the_language_model(tmp_path):
    """Pretraining moves only the vision tower, deterministically, and it learns to see."""
    import random

    from alphadrive_ray.data.synth import random_scene, render_scene
    from alphadrive_ray.models.tiny import build_processor, build_config, pretrain_vision, scene_attributes, train_tokenizer, default_corpus
    from transformers import Qwen2VLForConditionalGeneration

    spec = TinySpec(seed=0, vision_pretrain_steps=0)
    tokenizer = train_tokenizer(default_corpus(), spec.vocab_size)
    processor, config = build_processor(tokenizer, spec), build_config(tokenizer, spec)

    def fresh():
        torch.manual_seed(0)
        return Qwen2VLForConditionalGeneration(config)

    plain, trained, again = fresh(), fresh(), fresh()
    assert pretrain_vision(trained, processor, steps=60, seed=0) == pretrain_vision(again, processor, steps=60, seed=0)
    a, b, c = dict(plain.named_parameters()), dict(trained.named_parameters()), dict(again.named_parameters())
    for name in a:
        assert torch.equal(b[name], c[name]), name  # deterministic
        if ".visual." in f".{name}":
            continue
        assert torch.equal(a[name], b[name]), name  # the language model is untouched
    assert any(not torch.equal(a[n], b[n]) for n in a if ".visual." in f".{n}")
    # on fresh scenes, the pretrained tower's tokens tell a red light from none better than chance
    rng = random.Random(123)
    scenes = [random_scene(rng) for _ in range(64)]
    inputs = processor.image_processor(images=[render_scene(s, seed=i) for i, s in enumerate(scenes)], return_tensors="pt")
    labels = torch.tensor([scene_attributes(s)[0] for s in scenes])

    def probe_error(model):
        with torch.no_grad():
            out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            tokens = out.pooler_output if getattr(out, "pooler_output", None) is not None else out
            feats = tokens.view(len(scenes), -1, tokens.shape[-1]).max(1).values
        # nearest class mean on the pooled features, as a cheap linear-probe proxy
        means = torch.stack([feats[labels == k].mean(0) if (labels == k).any() else torch.full_like(feats[0], 1e9) for k in range(4)])
        return (torch.cdist(feats, means).argmin(1) != labels).float().mean().item()

    assert probe_error(trained) < probe_error(plain)


def test_parameter_count_is_a_few_million(tiny_vl):
    n = count_parameters(load_model(tiny_vl))
    assert 1e6 <= n <= 2e7, n
    spec = json.loads((tiny_vl / "tiny_spec.json").read_text())
    assert spec["seed"] == 0 and spec["text_hidden"] == TinySpec().text_hidden
    assert spec["language_pretrain_steps"] == tiny_test_spec().language_pretrain_steps


def test_text_only_variant(tiny_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert read_model_type(tiny_text) == "qwen2"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_text)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_text))
    assert load_processor(tiny_text).__class__.__name__ == tokenizer.__class__.__name__  # a tokenizer, no processor
    text = tokenizer.apply_chat_template(chat_messages(planning_prompt(3.0, "go straight")), add_generation_prompt=True, tokenize=False)
    assert "<|image_pad|>" not in text and text.endswith("<|im_start|>assistant\n")
    inputs = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5
    assert 1e6 <= count_parameters(model) <= 2e7


def test_ensure_model_does_not_rebuild(tiny_vl):
    stamp = (tiny_vl / "model.safetensors").stat().st_mtime_ns
    ensure_model(tiny_vl, init_tiny=True, spec=tiny_test_spec())  # the fixture's spec: nothing to do
    assert (tiny_vl / "model.safetensors").stat().st_mtime_ns == stamp


def test_ensure_model_never_overwrites_another_model(tiny_vl, tmp_path):
    other = tmp_path / "real-checkpoint"
    other.mkdir()
    shutil.copy(tiny_vl / "config.json", other / "config.json")  # a model folder with no tiny_spec.json
    with pytest.raises(UserError, match="holds another model"):
        ensure_model(other, init_tiny=True, spec=tiny_test_spec())
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]


def test_cli_model_info(tiny_vl, capsys):
    # in-process (the same `main` as the console script): a subprocess would spend ~10 s importing torch
    assert main(["model", "info", str(tiny_vl)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tiny_vl}: qwen2_vl, ") and "M parameters, vocabulary " in out
    assert "Qwen2VLForConditionalGeneration.from_pretrained" in out


def test_cli_init_tiny_text_only(tmp_path, capsys):
    assert main(["model", "init-tiny", str(tmp_path / "t"), "--text-only", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 't'}: qwen2, " in out and "AutoModelForCausalLM" in out
    assert read_model_type(tmp_path / "t") == "qwen2"


def bad_model_folder(tmp: Path, kind: str) -> Path:
    folder = tmp / kind
    if kind == "missing":
        return folder
    folder.mkdir()
    if kind == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif kind == "unsupported":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return folder


# (folder kind, words of the UserError)
LOADER_ERROR_CASES = [
    ("missing", "model folder not found"),  # a typo in model.path; the message points to init-tiny
    ("empty", "has no config.json"),  # a folder that is not a Hugging Face model
    ("bad_json", "not valid JSON"),  # a damaged config.json
    ("unsupported", "model_type 'bert' is not supported"),  # another architecture
]


@pytest.mark.parametrize("kind,words", LOADER_ERROR_CASES)
def test_loader_errors(tmp_path, kind, words):
    folder = bad_model_folder(tmp_path, kind)
    with pytest.raises(UserError, match=words):
        load_model(folder)
    with pytest.raises(UserError, match=words):
        load_processor(folder)
    with pytest.raises(UserError, match=words):
        ensure_model(folder, init_tiny=False)


def test_missing_folder_hint_and_cli(tmp_path):
    with pytest.raises(UserError, match="alphadrive-ray model init-tiny"):
        read_model_type(tmp_path / "nope")
    result = run_cli("model", "info", str(tmp_path / "nope"))
    assert result.returncode == 2 and result.stderr.startswith("error: model folder not found")
    assert "Traceback" not in result.stderr


def test_pretraining_does_not_depend_on_the_callers_thread_count(tmp_path):
    spec = TinySpec(seed=0, vision_pretrain_steps=3, language_pretrain_steps=3)
    threads = torch.get_num_threads()
    built = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            built.append(state(build_tiny_qwen2vl(tmp_path / f"threads-{n}", spec)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0])
