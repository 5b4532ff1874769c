"""The typed config: defaults, YAML loading, overrides, type and combination errors, the reference docs."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from alphadrive_ray.config import (
    Config,
    ConfigError,
    SynthSplitConfig,
    field_docs,
    load_config,
    parse_override,
    reference_markdown,
)

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphadrive_ray", *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def load_text(tmp_path: Path, text: str, overrides=()) -> Config:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return load_config(path, list(overrides))


def test_defaults_load_and_validate():
    config = load_config()
    assert config == Config()
    assert config.grpo.beta == 0.04 and config.grpo.kl_estimator == "k3" and config.reward.variant == "paper"
    assert set(config.to_dict()) == {f.name for f in dataclasses.fields(Config)}


def test_image_cache_default_is_the_encoders():
    # config.py keeps a literal (it does not import torch); it must not drift from the encoder's
    from alphadrive_ray.inputs import IMAGE_CACHE_MB

    assert Config().data.image_cache_mb == IMAGE_CACHE_MB


def test_empty_file_is_the_defaults(tmp_path):
    assert load_text(tmp_path, "# nothing set\n") == Config()


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.grpo.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("job", sorted(p for p in (REPO / "jobs").glob("*.yaml") if p.name != "runtime_env.yaml"), ids=lambda p: p.name)
def test_every_job_file_loads(job):
    assert isinstance(load_config(job), Config)


def test_yaml_values_and_their_types(tmp_path):
    config = load_text(
        tmp_path,
        """
run: {name: demo, seed: 3}
grpo:
  steps: 4.0          # a whole float is an integer
  lr: 1e-6            # YAML 1.1 reads this as text; accepted as a number
  beta: 0             # an integer is a number
reward:
  components: accuracy, format   # a comma-separated list
data:
  synth_eval: {n: 10, speed_mix: {STOP: 2, KEEP: 1}}
""",
    )
    assert (config.run.name, config.run.seed) == ("demo", 3)
    assert config.grpo.steps == 4 and isinstance(config.grpo.steps, int)
    assert config.grpo.lr == 1e-6 and config.grpo.beta == 0.0 and isinstance(config.grpo.beta, float)
    assert config.reward.components == ("accuracy", "format")
    assert config.data.synth_eval.speed_mix == {"STOP": 2.0, "KEEP": 1.0} and config.data.synth_eval.n == 10


# (YAML text, words of the error)
UNKNOWN_KEY_CASES = [
    ("grpo:\n  step: 3\n", "unknown config key `grpo.step`; did you mean `grpo.steps`?"),  # a typo in a field
    ("grpoo:\n  steps: 3\n", "unknown config key `grpoo`; did you mean `grpo`?"),  # a typo in a section
    ("data:\n  synth_train:\n    sed: 1\n", "unknown config key `data.synth_train.sed`; did you mean `data.synth_train.seed`?"),  # nested
    ("grpo:\n  zzzz: 1\n", "unknown config key `grpo.zzzz`; known keys: enabled, steps,"),  # nothing close: list them
]


@pytest.mark.parametrize("text,words", UNKNOWN_KEY_CASES)
def test_unknown_keys(tmp_path, text, words):
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert str(err.value).startswith(f"{tmp_path / 'job.yaml'}: ") and words in str(err.value)


# (YAML text, words of the error)
TYPE_ERROR_CASES = [
    ("grpo:\n  steps: ten\n", "grpo.steps: expected an integer, got 'ten'"),  # text for an integer
    ("grpo:\n  steps: 2.5\n", "grpo.steps: expected an integer, got 2.5"),  # a fraction for an integer
    ("grpo:\n  steps: true\n", "grpo.steps: expected an integer, got True"),  # a boolean is not an integer
    ("grpo:\n  lr: fast\n", "grpo.lr: expected a number, got 'fast'"),  # text for a number
    ("grpo:\n  lr: .inf\n", "grpo.lr: expected a finite number"),  # infinity
    ("grpo:\n  lr: nan\n", "grpo.lr: expected a finite number"),  # NaN (as text)
    ("grpo:\n  enabled: maybe\n", "grpo.enabled: expected true or false, got 'maybe'"),  # not a boolean
    ("grpo:\n  enabled: 1\n", "grpo.enabled: expected true or false, got 1"),  # 1 is not a boolean
    ("run:\n  name: [a, b]\n", "run.name: expected text"),  # a list for text
    ("run:\n  name:\n", "run.name: expected text, got None"),  # an empty value
    ("reward:\n  components: 5\n", "reward.components: expected a list"),  # a number for a list
    ("data:\n  synth_eval:\n    speed_mix: [KEEP]\n", "data.synth_eval.speed_mix: expected a mapping"),  # a list for a mapping
    ("data:\n  synth_eval:\n    speed_mix: {KEEP: lots}\n", "data.synth_eval.speed_mix.KEEP: expected a number"),  # a bad weight
    ("grpo: 5\n", "grpo: expected a mapping of enabled, steps,"),  # a section given a value
]


@pytest.mark.parametrize("text,words", TYPE_ERROR_CASES)
def test_type_errors(tmp_path, text, words):
    with pytest.raises(ConfigError, match=None) as err:
        load_text(tmp_path, text)
    assert words in str(err.value), str(err.value)


# (overrides on the defaults, words of the error)
VALUE_ERROR_CASES = [
    (["grpo.kl_estimator=k4"], "grpo.kl_estimator must be one of k1, k2, k3; got 'k4'"),  # not an option
    (["grpo.group_size=1"], "grpo.group_size must be at least 2"),  # GRPO needs a group
    (["rollout.temperature=0"], "rollout.temperature must be in (0, 10]"),  # greedy is not sampling
    (["rollout.top_p=1.5"], "rollout.top_p must be in (0, 1]"),  # out of range
    (["learner.zero_stage=4"], "learner.zero_stage must be 0, 1, 2 or 3"),  # no such stage
    (["reward.components=[accuracy, speed]"], "reward.components[] must be one of"),  # an unknown component
    (["reward.components=[format, format]"], "lists a component twice"),  # a duplicate
    (["grpo.lr=0"], "learning rates (sft.lr, grpo.lr) must be > 0"),  # no learning
    (["data.synth_train.speed_mix={keep: 1}"], "data.synth_train.speed_mix names unknown classes ['keep']"),  # lower case class
    (["data.synth_eval.path_mix={STRAIGHT: 0}"], "data.synth_eval.path_mix weights must be >= 0 with at least one > 0"),  # all zero
    (["data.synth_train.size=32"], "data.synth_train.size must be between 56 and 4096"),  # too small to render
    (["data.prompt_template=Speed {speed}"], "must contain the {speed} and {navigation} slots"),  # a slot missing
    (["data.max_pixels=100"], "data.max_pixels must be 0 (the model's own) or at least 784"),  # less than one image token
    (["data.min_pixels=-1"], "data.min_pixels must be 0 (the model's own) or at least 784"),  # negative
    (["data.min_pixels=401408", "data.max_pixels=3136"], "data.min_pixels (401408) must not exceed data.max_pixels (3136)"),  # crossed
]


@pytest.mark.parametrize("overrides,words", VALUE_ERROR_CASES)
def test_value_errors(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith("config: invalid configuration:\n  - ") and words in str(err.value), str(err.value)


# (overrides on the defaults, words of the error)
COMBINATION_CASES = [
    # 3 prompts cannot be shared by 2 rollout workers in whole groups
    (["grpo.prompts_per_step=3", "rollout.num_workers=2"], "grpo.prompts_per_step (3) must be a multiple of rollout.num_workers (2)"),
    # 3 x 3 = 9 completions do not split over 2 learners
    (
        ["grpo.prompts_per_step=3", "grpo.group_size=3", "rollout.num_workers=1", "learner.num_workers=2"],
        "grpo.prompts_per_step x grpo.group_size = 9 completions must split evenly over learner.num_workers (2)",
    ),
    # 16 samples over 2 learners is 8 each, not a multiple of micro-batches of 3; the message proposes a value
    (
        ["sft.micro_batch_size=3"],
        "sft.batch_size (16) must split evenly over learner.num_workers (2) into micro-batches of sft.micro_batch_size (3); "
        "e.g. set sft.batch_size to 18",
    ),
    # an engine batch smaller than one group
    (["rollout.batch_size=4"], "rollout.batch_size (4) must hold at least one group (grpo.group_size = 8)"),
    # NCCL weight sync needs vLLM engines
    (["sync.backend=nccl"], "sync.backend=nccl needs rollout.engine=vllm"),
    (["sync.backend=gloo", "rollout.engine=vllm"], "sync.backend=gloo needs rollout.engine=hf"),
    # vLLM needs GPUs
    (["rollout.engine=vllm"], "rollout.engine=vllm needs GPUs: set rollout.gpus_per_worker"),
    # sync.verify compares the HF engine's parameters by name; vLLM fuses them
    (["sync.verify=true", "rollout.engine=vllm", "rollout.gpus_per_worker=1"], "sync.verify needs rollout.engine=hf"),
    # checkpoint.keep 0 writes none, so periodic checkpoints make no sense
    (["checkpoint.keep=-1"], "checkpoint.keep must be 0 (no checkpoints) or more; got -1"),
    (["checkpoint.keep=0", "checkpoint.every_steps=10"], "checkpoint.every_steps 10 needs checkpoint.keep >= 1"),
    # tensor parallelism: vLLM only, and each engine holds as many GPUs as it has shards
    (["rollout.tensor_parallel_size=0"], "rollout.tensor_parallel_size must be at least 1; got 0"),
    (["rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size 2 needs rollout.engine=vllm"),
    (
        ["rollout.tensor_parallel_size=2", "rollout.engine=vllm", "rollout.gpus_per_worker=1"],
        "rollout.tensor_parallel_size 2 needs rollout.gpus_per_worker 2 (each engine holds its 2 GPUs); got 1",
    ),
]


@pytest.mark.parametrize("overrides,words", COMBINATION_CASES)
def test_combination_errors(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert words in str(err.value), str(err.value)


def test_every_error_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["grpo.kl_estimator=k9", "rollout.top_p=0", "learner.zero_stage=7"])
    assert str(err.value).count("\n  - ") == 3


# (override text, (key, value) or the words of the error)
OVERRIDE_CASES = [
    ("grpo.steps=10", ("grpo.steps", 10)),  # an integer
    ("grpo.beta=0.0", ("grpo.beta", 0.0)),  # a float
    ("model.init_tiny=true", ("model.init_tiny", True)),  # a boolean
    ("run.name=my run", ("run.name", "my run")),  # text with a space
    ("reward.components=[accuracy, format]", ("reward.components", ["accuracy", "format"])),  # a YAML list
    ("data.synth_eval.speed_mix={STOP: 2}", ("data.synth_eval.speed_mix", {"STOP": 2})),  # a YAML mapping
    (" grpo.steps =5", ("grpo.steps", 5)),  # spaces around the key
    ("run.name=", ("run.name", "")),  # an empty value is empty text
    ("a=b=c", ("a", "b=c")),  # only the first = splits
    ("grpo.steps", "--set expects KEY=VALUE"),  # no =
    ("=5", "--set expects KEY=VALUE"),  # no key
    ("grpo.steps=[1", "value is not valid YAML"),  # broken YAML
]


@pytest.mark.parametrize("text,expected", OVERRIDE_CASES)
def test_parse_override(text, expected):
    if isinstance(expected, tuple):
        assert parse_override(text) == expected
    else:
        with pytest.raises(ConfigError, match=expected):
            parse_override(text)


def test_overrides_win_over_the_file(tmp_path):
    config = load_text(tmp_path, "grpo:\n  steps: 7\n  lr: 2.0e-6\n", ["grpo.steps=9", "run.name=x"])
    assert (config.grpo.steps, config.grpo.lr, config.run.name) == (9, 2e-6, "x")


# (overrides, words of the error)
BAD_OVERRIDE_CASES = [
    (["grpo.stpes=3"], "did you mean `grpo.steps`?"),  # a typo through --set
    (["run.name.first=1"], "--set run.name.first: `name` is not a section"),  # a field used as a section
    (["grpo.steps=many"], "grpo.steps: expected an integer"),  # a type error through --set
]


@pytest.mark.parametrize("overrides,words", BAD_OVERRIDE_CASES)
def test_bad_overrides(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, "run:\n  name: demo\n", overrides)
    assert words in str(err.value), str(err.value)


# (YAML text, line named, words of the error)
YAML_SYNTAX_CASES = [
    ("run:\n  name: demo\ngrpo:\n  steps: [1, 2\n", 5, "expected ',' or ']'"),  # an unclosed list, found at the end of the file
    ("run:\n  name: demo\n bad: 1\n", 3, "expected <block end>"),  # a key indented wrongly
    ("grpo:\n\tsteps: 3\n", 2, "cannot start any token"),  # a tab
    ("run:\n  name: 'demo\n", 3, "unexpected end of stream"),  # an unclosed quote
]


@pytest.mark.parametrize("text,line,words", YAML_SYNTAX_CASES)
def test_yaml_syntax_error_names_the_line(tmp_path, text, line, words):
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'job.yaml'}:{line}: not valid YAML: ") and words in message, message


# (file content as bytes or None for no file, words of the error)
FILE_CASES = [
    (None, "config file not found"),  # a typo in the path
    (b"- run\n- grpo\n", "expected a mapping of sections"),  # a list at the top
    (b"just text\n", "expected a mapping of sections"),  # a scalar at the top
    (b"run:\n  name: caf\xe9\n", "not UTF-8 text"),  # latin-1 bytes
]


@pytest.mark.parametrize("content,words", FILE_CASES)
def test_file_errors(tmp_path, content, words):
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=words):
        load_config(path)


def test_every_field_is_documented():
    hints = typing.get_type_hints(Config)
    sections = [hints[f.name] for f in dataclasses.fields(Config)]
    for cls in sections + [SynthSplitConfig]:  # every section, and the sub-section of data
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: document these fields with a string under each: {missing}"


def test_docs_config_md_is_current():
    expected = reference_markdown() + "\n"  # as written by `alphadrive-ray config-docs > docs/config.md`
    path = REPO / "docs" / "config.md"
    assert path.is_file(), "docs/config.md is missing: run `alphadrive-ray config-docs > docs/config.md`"
    assert path.read_text() == expected, (
        "docs/config.md is out of date with alphadrive_ray/config.py: regenerate it with `alphadrive-ray config-docs > docs/config.md` and commit it"
    )
    for section in dataclasses.fields(Config):
        assert f"## `{section.name}`" in expected


def test_cli_config_docs():
    result = run_cli("config-docs")
    assert result.returncode == 0 and result.stdout == reference_markdown() + "\n"


def test_cli_train_reports_config_errors_without_traceback(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("grpo:\n  step: 3\n")
    result = run_cli("train", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "did you mean `grpo.steps`?" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("train", str(path), "--set", "grpo.steps=3", "--set", "grpo=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "overrides, untrained, final",
    [
        (("model.init_tiny=true",), "base model (zero-shot)", "after SFT + GRPO"),
        (("model.init_tiny=true", "grpo.enabled=false"), "base model (zero-shot)", "final (SFT only)"),
        (("sft.enabled=false", "model.init_tiny=false"), "starting model", "after GRPO"),
    ],
)
def test_summary_names_the_stages_the_run_had(overrides, untrained, final):
    from alphadrive_ray.train.trainer import stage_labels

    labels = stage_labels(load_config(None, list(overrides)))
    assert (labels["untrained"], labels["final"]) == (untrained, final)


# --- every key is read by the code it configures ------------------------------------------
#
# A static check, over the package's source (in config.py only Config's own properties
# count: validating a key is not using it): every field of every section must be read as an attribute of that section by
# some code, e.g. `config.grpo.lr`, `self.config.grpo.lr`, or `c.lr` after `c = self.config.grpo`
# (aliases through assignments, tuple assignments and loops over tuples are followed). A key
# that no code reads changes nothing, and fails here (sft.weight_decay and grpo.weight_decay
# did: the learner's AdamW always got 0.0). What a read key does is for the tests of its feature.

ROOT = "<config>"


def _section_fields() -> dict[str, set[str]]:
    """'grpo' -> its field names; sub-sections too ('data.synth_train' -> n, seed, ...)."""
    out: dict[str, set[str]] = {ROOT: {f.name for f in dataclasses.fields(Config)}}

    def walk(cls, path: str) -> None:
        hints = typing.get_type_hints(cls)
        out[path] = {f.name for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{path}.{f.name}")

    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        walk(hints[section.name], section.name)
    return out


def _child(path: str, attr: str) -> str:
    return attr if path == ROOT else f"{path}.{attr}"


def _getattr_key(node) -> str | None:
    """'key' of a call `getattr(obj, "key")`, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2:
        arg = node.args[1]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def _section_classes() -> dict[str, set[str]]:
    """A section's class name -> the config paths of that type ('SynthSplitConfig' -> both splits;
    'Config' -> the whole config, as in `from_config(c: Config)`)."""
    out: dict[str, set[str]] = {Config.__name__: {ROOT}}

    def walk(cls, path: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                child = _child(path, f.name)
                out.setdefault(hints[f.name].__name__, set()).add(child)
                walk(hints[f.name], child)

    walk(Config, ROOT)
    return out


class _ConfigReads(ast.NodeVisitor):
    """Collects `section.key` reads; names are bound to config paths per function scope."""

    def __init__(self, fields: dict[str, set[str]]):
        self.fields = fields
        self.reads: set[str] = set()
        self.env: dict[str, set[str]] = {}
        self.classes = _section_classes()

    def visit_arguments(self, node):
        # a parameter annotated with a section's class (`wandb_config: WandbConfig`) is that section
        for arg in node.posonlyargs + node.args + node.kwonlyargs:
            annotation = arg.annotation
            name = annotation.value if isinstance(annotation, ast.Constant) else getattr(annotation, "id", getattr(annotation, "attr", None))
            if isinstance(name, str) and name in self.classes:
                self.env.setdefault(arg.arg, set()).update(self.classes[name])
        self.generic_visit(node)

    def paths(self, node) -> set[str]:
        """The config paths an expression may denote (empty: not a config object)."""
        if isinstance(node, ast.Name):
            if node.id in ("config", "cfg"):
                return {ROOT}
            return self.env.get(node.id, set())
        if isinstance(node, ast.Attribute):
            if node.attr == "config":
                return {ROOT}
            return {_child(p, node.attr) for p in self.paths(node.value) if _child(p, node.attr) in self.fields}
        key = _getattr_key(node)
        if key is not None:
            return {_child(p, key) for p in self.paths(node.args[0]) if _child(p, key) in self.fields}
        return set()

    def bind(self, target, value_paths_of) -> None:
        if isinstance(target, ast.Name):
            found = value_paths_of(None)
            if found:
                self.env.setdefault(target.id, set()).update(found)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for i, elt in enumerate(target.elts):
                self.bind(elt, lambda _, i=i: value_paths_of(i))

    def _elements(self, value, i):
        """Paths of element i of a tuple expression, or of every tuple inside a tuple (loops)."""
        if i is None:
            return self.paths(value)
        if isinstance(value, (ast.Tuple, ast.List)) and i < len(value.elts):
            return self.paths(value.elts[i])
        return set()

    def visit_Assign(self, node):
        for target in node.targets:
            self.bind(target, lambda i: self._elements(node.value, i))
        self.generic_visit(node)

    def visit_For(self, node):
        items = node.iter.elts if isinstance(node.iter, (ast.Tuple, ast.List)) else []
        for item in items:
            self.bind(node.target, lambda i, item=item: self._elements(item, i))
        self.generic_visit(node)

    def visit_Attribute(self, node):
        for path in self.paths(node.value):
            if node.attr in self.fields.get(path, ()):
                self.reads.add(_child(path, node.attr))
        self.generic_visit(node)

    def visit_Call(self, node):
        key = _getattr_key(node)  # getattr(section, "key")
        if key is not None:
            for path in self.paths(node.args[0]):
                if key in self.fields.get(path, ()):
                    self.reads.add(_child(path, key))
        self.generic_visit(node)


def config_reads(sources: dict[str, str]) -> set[str]:
    """Every `section.key` (and `section.sub.key`) that the given module sources read."""
    fields = _section_fields()
    reads: set[str] = set()
    for text in sources.values():
        tree = ast.parse(text)
        # one scope per function (nested functions share their parent's names), and the
        # module's own statements
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        top = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        methods = {id(m) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "Config" for m in c.body}
        for scope in functions + [ast.Module(body=top, type_ignores=[])]:
            visitor = _ConfigReads(fields)
            if id(scope) in methods:
                visitor.env["self"] = {ROOT}  # Config's own properties (run_dir)
            for _ in range(2):  # bindings first (an alias of an alias), then the reads with them all
                visitor.visit(scope)
            reads |= visitor.reads
    return reads


def all_keys() -> set[str]:
    return {
        _child(path, name)
        for path, names in _section_fields().items()
        if path != ROOT
        for name in names
        if _child(path, name) not in _section_fields()
    }


def test_the_key_reader_follows_aliases_and_finds_unread_keys():
    source = (
        "def f(self):\n"
        "    c = self.config.grpo\n"
        "    r, l = self.config.rollout, self.config.learner\n"
        "    for path, synth in ((self.config.data.train, self.config.data.synth_train),):\n"
        "        print(synth.n)\n"
        "    def inner():\n"
        "        return c.lr + l.zero_stage\n"
        "    return r.top_p, getattr(self.config.sft, 'epochs')\n"
        "def g(section: 'GRPOConfig', split: SynthSplitConfig):\n"
        "    return section.group_size, split.seed\n"
        "def h(c: Config):\n"
        "    r = c.reward\n"
        "    return r.diversity_cap\n"
    )
    reads = config_reads({"snippet.py": source})
    assert {"grpo.lr", "rollout.top_p", "learner.zero_stage", "data.train", "data.synth_train.n", "sft.epochs"} <= reads
    assert {"grpo.group_size", "data.synth_train.seed", "data.synth_eval.seed", "reward.diversity_cap"} <= reads  # annotated parameters
    assert "grpo.weight_decay" not in reads and "sft.lr" not in reads


def test_every_config_key_is_read_by_the_code_it_configures():
    package = REPO / "alphadrive_ray"
    sources = {str(p): p.read_text() for p in package.rglob("*.py")}
    unread = sorted(all_keys() - config_reads(sources))
    assert not unread, f"config keys that no code reads (they change nothing): {unread}"


def test_worker_specs_are_derived_from_the_config():
    # every worker spec comes from the config in one place: non-default values reach them
    from alphadrive_ray.workers.learner import LearnerSpec
    from alphadrive_ray.workers.reward import RewardSpec
    from alphadrive_ray.workers.rollout import RolloutSpec

    c = load_config(
        None,
        [
            "model.path=/models/m",
            "model.dtype=bfloat16",
            "data.image_cache=false",
            "data.min_pixels=3136",
            "data.max_pixels=401408",
            "rollout.top_p=0.9",
            "rollout.gpus_per_worker=1",
            "learner.gpus_per_worker=1",
            "reward.variant=release",
            "reward.diversity_cap=0.3",
            "run.seed=7",
            "rollout.engine=vllm",
            "rollout.tensor_parallel_size=2",
            "rollout.gpus_per_worker=2",
        ],
    )
    learner, rollout, reward = LearnerSpec.from_config(c), RolloutSpec.from_config(c), RewardSpec.from_config(c)
    assert (learner.model_path, learner.dtype, learner.image_cache_mb, learner.min_pixels, learner.max_pixels) == (
        "/models/m",
        "bfloat16",
        0,
        3136,
        401408,
    )
    assert (learner.top_p, learner.seed, learner.backend) == (0.9, 7, "nccl")  # auto: NCCL on GPUs
    assert (rollout.model_path, rollout.image_cache_mb, rollout.min_pixels, rollout.max_pixels, rollout.device) == (
        "/models/m",
        0,
        3136,
        401408,
        "cuda",
    )
    assert (rollout.engine, rollout.tensor_parallel_size) == ("vllm", 2)
    assert (reward.variant, reward.diversity_cap, reward.components) == ("release", 0.3, c.reward.components)
    assert LearnerSpec.from_config(load_config(None, [])).backend == "gloo"  # auto on CPU


def test_nccl_sync_layout_gives_every_tensor_parallel_shard_a_rank():
    from alphadrive_ray.workers.group import nccl_sync_layout

    assert nccl_sync_layout(4) == (5, [1, 2, 3, 4])  # learner rank 0, then one vLLM worker per engine
    # 2 engines of 4 shards: ranks 1-4 and 5-8 (an engine's worker joins at its first rank + its TP rank)
    assert nccl_sync_layout(2, 4) == (9, [1, 5])
    with pytest.raises(ValueError):
        nccl_sync_layout(0)
