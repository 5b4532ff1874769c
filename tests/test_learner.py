"""One learner rank on real batches: weight decay.

Real parts throughout: DeepSpeed learners in Ray actors, the tiny Qwen2-VL.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TEST_PROMPT

TOP_P = 0.3


def learner_spec(model_dir, **kw):
    from alphadrive_ray.workers.learner import LearnerSpec

    return LearnerSpec(
        model_path=model_dir, prompt_template=TEST_PROMPT, backend="gloo", cpus=1, seed=0, **kw
    )


@pytest.fixture(scope="module")
def learner(ray_cluster, tiny_vl_dir):
    """One rank that scores under top-p, as with `rollout.top_p: 0.3`."""
    from alphadrive_ray.workers.group import LearnerGroup, Resources

    group = LearnerGroup.start(learner_spec(tiny_vl_dir, top_p=TOP_P), 1, Resources(cpus=1))
    yield group
    group.shutdown()


def test_weight_decay_reaches_adamw(learner, scenes, tmp_path):
    """The same SFT step from the same state, with and without decay: AdamW's decoupled decay
    moves every weight by exactly -lr x weight_decay x its value."""
    from alphadrive_ray.actions import format_completion
    from alphadrive_ray.workers.learner import SFTExample

    batch = [SFTExample(r, format_completion(r.reasoning, r.speed_action, r.path_action)) for r in scenes[:4]]
    lr, decay = 1e-2, 0.5
    learner.begin_stage("sft", weight_decay=0.0)
    learner.save_state(str(tmp_path / "start"), {})
    start = learner.state_dict_cpu()
    learner.sft_step(batch, 4, lr)
    plain = learner.state_dict_cpu()
    learner.load_state(str(tmp_path / "start"))
    learner.begin_stage("sft", weight_decay=decay)
    learner.sft_step(batch, 4, lr)
    decayed = learner.state_dict_cpu()
    for name, value in start.items():
        torch.testing.assert_close(
            decayed[name] - plain[name], -lr * decay * value, rtol=0, atol=2e-6, msg=name
        )
    assert max((decayed[n] - plain[n]).abs().max().item() for n in start) > 1e-4  # it did something
