"""What surrounds vLLM in alphadrive_ray/engines/vllm_engine.py, in the main environment (no vLLM):
requests, sampling parameters, the conversion of vLLM outputs into groups, weight checks.

vLLM itself runs in tests/test_vllm_cpu.py (its own environment).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from alphadrive_ray.engines import vllm_engine as ve
from alphadrive_ray.errors import UserError
from tests.conftest import TEST_PROMPT


def test_imports_without_vllm():
    code = "import sys, alphadrive_ray.engines.vllm_engine; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_gpu_extra_pins_the_tested_version():
    import tomllib

    from tests.conftest import REPO

    gpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert f"vllm=={ve.VLLM_VERSION}" in gpu
    assert f"VLLM_VERSION={ve.VLLM_VERSION}" in (REPO / "scripts" / "setup_vllm_cpu.sh").read_text()


# --- requests ---------------------------------------------------------------------------------


def test_text_only_requests_are_the_chat_prompt(tiny_text_dir, scenes):
    from alphadrive_ray.inputs import PromptEncoder
    from alphadrive_ray.models.loading import load_processor

    encoder = PromptEncoder(load_processor(tiny_text_dir), TEST_PROMPT)
    requests = ve.build_requests(encoder, scenes[:2])
    assert requests == [{"prompt": encoder.prompt_text(r)} for r in scenes[:2]]
    assert requests[0]["prompt"].endswith("<|im_start|>assistant\n")


def test_qwen2vl_requests_carry_the_image_and_one_placeholder(tiny_vl_dir, scenes):
    """vLLM 0.32 expects `<|vision_start|><|image_pad|><|vision_end|>` once per image and the PIL
    image in multi_modal_data; expanded by the HF processor, the prompt is the learner's."""
    from alphadrive_ray.inputs import PromptEncoder, load_image
    from alphadrive_ray.models.loading import load_processor

    encoder = PromptEncoder(load_processor(tiny_vl_dir), TEST_PROMPT)
    (request,) = ve.build_requests(encoder, scenes[:1])
    assert set(request) == {"prompt", "multi_modal_data"} and set(request["multi_modal_data"]) == {"image"}
    image = request["multi_modal_data"]["image"]
    assert image.mode == "RGB" and image.size == load_image(scenes[0].image).size
    assert request["prompt"].count(ve.QWEN2_VL_IMAGE_PLACEHOLDER) == 1
    expanded = encoder.processor(text=[request["prompt"]], images=[image], return_tensors="pt")["input_ids"][0]
    assert tuple(expanded.tolist()) == encoder.encode(scenes[0]).input_ids


def test_an_image_needs_exactly_one_placeholder():
    with pytest.raises(ValueError, match="once"):
        ve.build_request("no placeholder here", image=object())
    with pytest.raises(ValueError, match="once"):
        ve.build_request(ve.QWEN2_VL_IMAGE_PLACEHOLDER * 2, image=object())


# --- sampling parameters ----------------------------------------------------------------------

BASE = dict(max_tokens=16, seed=7, banned_ids=[5, 3], stop_token_ids=[9])


@pytest.mark.parametrize(
    "args, expected",
    [
        # sampling: G completions, our temperature and nucleus, nothing else reshaping the distribution
        (dict(n=4, temperature=0.7, top_p=0.9), dict(n=4, temperature=0.7, top_p=0.9, top_k=0, min_p=0.0, seed=7)),
        # greedy: vLLM's temperature 0, which it runs with n = 1 (no seed, no top-p)
        (dict(n=4, temperature=0.7, top_p=0.9, greedy=True), dict(n=1, temperature=0.0)),
        # temperature 0 (the serve API's greedy) is greedy too
        (dict(n=1, temperature=0.0, top_p=1.0), dict(n=1, temperature=0.0)),
    ],
)
def test_sampling_kwargs(args, expected):
    kwargs = ve.sampling_kwargs(**BASE, **args)
    assert {k: kwargs[k] for k in expected} == expected
    if expected["temperature"] == 0.0:
        assert "seed" not in kwargs and "top_p" not in kwargs
    # bans: -inf logit bias (vLLM adds it before temperature / top-p, as apply_sampling_transform)
    assert kwargs["logit_bias"] == {5: float("-inf"), 3: float("-inf")}
    # the sampled token's log-prob; the end-of-turn token stops; we decode the text ourselves
    assert kwargs["logprobs"] == 0 and kwargs["stop_token_ids"] == [9] and kwargs["max_tokens"] == 16
    assert kwargs["detokenize"] is False and kwargs["stop"] is None


def test_sampling_kwargs_without_bans_and_with_stop_strings():
    kwargs = ve.sampling_kwargs(**{**BASE, "banned_ids": []}, n=1, temperature=1.0, top_p=1.0, stop=("\n",))
    assert kwargs["logit_bias"] is None
    assert kwargs["stop"] == ["\n"] and kwargs["detokenize"] is True  # stop strings need vLLM's text


# --- outputs -> groups ------------------------------------------------------------------------


def vllm_completion(ids, finish="length", lps=None):
    """A stand-in for vllm.CompletionOutput: one {token: Logprob} dict per generated token."""
    lps = lps or [-0.5 - i for i in range(len(ids))]
    return SimpleNamespace(
        token_ids=ids,
        logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, lps)],
        finish_reason=finish,
        text="(vLLM text is not used)",
    )


def decode(ids):
    return " ".join(map(str, ids))


def test_groups_keep_record_order_tokens_logprobs_and_version(scenes):
    outputs = [
        SimpleNamespace(outputs=[vllm_completion([1, 2, 9], "stop"), vllm_completion([4, 5, 6])]),
        SimpleNamespace(outputs=[vllm_completion([7], "stop", [-0.25]), vllm_completion([8, 8])]),
    ]
    groups = ve.groups_from_outputs(scenes[:2], outputs, n=2, decode=decode, weight_version=4)
    assert [g.record.id for g in groups] == [r.id for r in scenes[:2]]
    first = groups[0].completions[0]
    assert (first.token_ids, first.logprobs, first.finish_reason, first.text, first.weight_version) == (
        [1, 2, 9],
        [-0.5, -1.5, -2.5],
        "stop",
        "1 2 9",
        4,
    )
    assert groups[0].completions[1].finish_reason == "length"
    assert groups[1].completions[0].logprobs == [-0.25]


def test_greedy_answers_are_repeated_to_fill_the_group(scenes):
    outputs = [SimpleNamespace(outputs=[vllm_completion([3, 4])])]
    (group,) = ve.groups_from_outputs(scenes[:1], outputs, n=3, decode=decode, weight_version=0)
    assert [c.token_ids for c in group.completions] == [[3, 4]] * 3


@pytest.mark.parametrize(
    "outputs, message",
    [
        ([], "answered 0 requests, 1 were sent"),  # a lost request
        ([SimpleNamespace(outputs=[])], "no completion"),  # an empty answer
        ([SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1, 2], logprobs=None, finish_reason="length")])], "logprobs=0"),
    ],
)
def test_malformed_outputs_raise(scenes, outputs, message):
    with pytest.raises(RuntimeError, match=message):
        ve.groups_from_outputs(scenes[:1], outputs, n=1, decode=decode, weight_version=0)


# --- weights ----------------------------------------------------------------------------------


def test_chunks_hold_about_the_given_bytes():
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 10, 10, 100, 1])]
    chunks = [[name for name, _ in c] for c in ve.chunk_tensors(tensors, chunk_bytes=80)]
    # 40-byte tensors pair up; the 400-byte one travels alone; nothing is lost or reordered
    assert chunks == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


@pytest.mark.parametrize("which", ["tiny_text_dir", "tiny_vl_dir"])
def test_parameter_shapes_are_the_learners(which, request):
    """The names and shapes the engine accepts are those of the learner's `named_parameters`."""
    from alphadrive_ray.models.loading import load_model

    folder = request.getfixturevalue(which)
    learner = {n: tuple(p.shape) for n, p in load_model(folder).named_parameters()}
    shapes = ve.hf_parameter_shapes(folder)
    assert shapes == learner and list(shapes) == list(learner)


def test_unknown_names_and_wrong_shapes_are_refused(tiny_text_dir):
    shapes = ve.hf_parameter_shapes(tiny_text_dir)
    name, shape = next(iter(shapes.items()))
    assert list(ve.checked([(name, torch.zeros(shape))], shapes))[0][0] == name
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        list(ve.checked([("nope", torch.zeros(1))], shapes))
    with pytest.raises(ValueError, match=f"{name} has shape"):
        ve.check_weight(name, (*shape, 2), shapes)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_engine_says_how_to_get_it(tiny_text_dir):
    from alphadrive_ray.workers.rollout import RolloutSpec, make_engine

    with pytest.raises(UserError, match=r"\[gpu\]"):
        make_engine(RolloutSpec(model_path=tiny_text_dir, engine="vllm"))
    with pytest.raises(UserError, match=r"\[gpu\]"):
        ve.build_chat_backend(tiny_text_dir)
