import subprocess
import sys

import pytest

from cwt_ray.config import UserError, load_config, parse_overrides
from conftest import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_configs_in_repo_validate():
    for path in sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "experiments").glob("*.yaml")]):
        if "sweep" in path.name:   # sweep files: tests/test_sweep.py
            continue
        cfg = load_config(path)
        assert cfg.name and cfg.methods


def test_dotted_overrides_are_typed():
    cfg = load_config(QUICKSTART, ["train.lr=3e-4", "methods=[cwt]", "chunk.num_chunks=5", "stages.chunk_marker="])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.methods == ["cwt"]
    assert cfg.chunk.num_chunks == 5
    assert cfg.stages.chunk_marker == ""


@pytest.mark.parametrize("override, needle", [
    ("train.lr=oops", "'train.lr'"),
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("chunk.heuristic=magic", "'chunk.heuristic'"),
    ("methods=[std_cot, foo]", "'methods.1'"),
    ("task.answer_template=no-slot", "'task.answer_template'"),
    ("train.batch_size=7", "multiple of train.micro_batch_size"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(UserError) as err:
        load_config(QUICKSTART, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(UserError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override():
    with pytest.raises(UserError, match="expected key.sub=value"):
        parse_overrides(["train.lr"])


@pytest.mark.parametrize("args, needle", [
    ([str(QUICKSTART), "train.lr=oops"], "train.lr"),
    ([str(QUICKSTART), "train.lrr=1"], "unknown config key 'train.lrr'"),
    (["configs/does-not-exist.yaml"], "configs/does-not-exist.yaml"),
    ([str(QUICKSTART), "chunk.heuristic=semantic", "chunk.embedding_model=/no/such/model"], "chunk.embedding_model"),
    ([str(QUICKSTART), "chunk.num_chunks=0"], "chunk.num_chunks"),
    ([str(QUICKSTART), "data.source=jsonl", "data.train_path=/no/train.jsonl", "data.test_path=/no/test.jsonl"],
     "data.train_path: file not found: /no/train.jsonl"),
    ([str(QUICKSTART), "student.name=/no/student"], "student.name"),
])
def test_cli_user_errors_exit_2_with_one_line(args, needle):
    proc = subprocess.run([sys.executable, "-m", "cwt_ray.cli", "run", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_for_every_command():
    for cmd in ([], ["data"], ["run"], ["chunk"], ["train"], ["eval"], ["report"]):
        proc = subprocess.run([sys.executable, "-m", "cwt_ray.cli", *cmd, "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 0 and "usage: cwt-ray" in proc.stdout


@pytest.mark.parametrize("overrides, needle", [
    (["data.source=files"], "needs data.paths, or data.train_path and data.test_path"),
    (["data.source=files", "data.paths=[a.jsonl]", "data.train_path=b.jsonl"], "do not combine"),
    (["data.source=files", "data.paths=[a.jsonl]", "data.split_fractions={train: 0.5, test: 0.2}"], "sum to 1"),
    (["data.fields={id: id, label: y}"], "data.fields has unknown key"),
    (["data.too_long=cut"], "'data.too_long'"),
    (["data.max_reject_fraction=1.5"], "'data.max_reject_fraction'"),
    (["teach.prompt=few_shot"], "needs teach.few_shot_examples"),
    (["teach.temperature=0", "teach.num_samples=3"], "needs teach.temperature > 0"),
    (["teach.zero_shot_template=no slot"], "must contain {question}"),
])
def test_bad_data_and_teach_settings_name_the_key(overrides, needle):
    with pytest.raises(UserError) as err:
        load_config(QUICKSTART, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_old_jsonl_source_name_still_reads_files():
    cfg = load_config(QUICKSTART, ["data.source=jsonl", "data.train_path=a.jsonl", "data.test_path=b.jsonl"])
    assert cfg.data.source == "files" and cfg.data.train_path == "a.jsonl"


def test_without_the_dashboard_workers_silence_ray_trains_state_api_poll():
    """ray.include_dashboard: false (the trimmed GPU wheel) installs this hook in every worker by
    its module path: it must import, and it must quiet the cleaner's once-a-second warning."""
    import importlib
    import logging

    from cwt_ray.cluster import QUIET_WITHOUT_STATE_API, RAY_TRAIN_PG_CLEANER

    module, name = QUIET_WITHOUT_STATE_API.rsplit(".", 1)
    logger = logging.getLogger(RAY_TRAIN_PG_CLEANER)
    level = logger.level
    try:
        getattr(importlib.import_module(module), name)()
        assert not logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(level)
    # The logger name is Ray's module path: it must still exist in this Ray version.
    assert importlib.util.find_spec(RAY_TRAIN_PG_CLEANER)


def test_embedded_cluster_runs_ray_train_without_the_preemption_watcher():
    """An embedded cluster is one machine that no autoscaler drains: our job's env turns Ray Train's
    preemption watcher off there, and only there (a cluster we join keeps it)."""
    from ray.train.v2._internal import constants

    from cwt_ray.cluster import QUIET_WITHOUT_STATE_API, RAY_TRAIN_PREEMPTION_WATCHER, job_runtime_env

    cfg = load_config(QUICKSTART)
    local = job_runtime_env(cfg, "local")
    assert local["env_vars"][RAY_TRAIN_PREEMPTION_WATCHER] == "0"
    assert local["env_vars"]["HF_HUB_OFFLINE"] == "1" and "worker_process_setup_hook" not in local
    joined = job_runtime_env(cfg, "ray://head:10001")
    assert RAY_TRAIN_PREEMPTION_WATCHER not in joined["env_vars"]
    no_dash = job_runtime_env(load_config(QUICKSTART, ["ray.include_dashboard=false"]), "local")
    assert no_dash["worker_process_setup_hook"] == QUIET_WITHOUT_STATE_API
    # Ray's name for the switch: a Ray upgrade that renames it must fail here, not go unnoticed.
    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR == RAY_TRAIN_PREEMPTION_WATCHER


def test_a_default_changed_in_code_redoes_the_stages_that_depend_on_it(tmp_path, monkeypatch):
    """Fingerprints hash every effective value, defaults included: a run (or a sweep) finished under
    an old default must not be reused after the default changes in code."""
    from cwt_ray.config import ExperimentConfig, TrainConfig
    from cwt_ray.pipeline import RunState
    from cwt_ray.sweep_config import load_sweep

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"storage_path={tmp_path}"])
    assert "weight_decay" not in (ROOT / "configs" / "smoke.yaml").read_text()   # left at its default
    cfg.run_dir.mkdir(parents=True)
    state = RunState(cfg.run_dir, cfg)
    for key in ("data", "chunk", "train/std_cot", "train/cwt"):
        state.mark(key)
    sweep_before = load_sweep(ROOT / "configs" / "sweep_smoke.yaml").fingerprint()
    # An explicit value equal to the default is the same config.
    same = load_config(ROOT / "configs" / "smoke.yaml", [f"storage_path={tmp_path}", "train.weight_decay=0.0"])
    assert RunState(same.run_dir, same).is_done("train/cwt")

    monkeypatch.setitem(TrainConfig.model_fields, "weight_decay", type(TrainConfig.model_fields["weight_decay"])
                        .merge_field_infos(TrainConfig.model_fields["weight_decay"], default=0.01))
    TrainConfig.model_rebuild(force=True)
    ExperimentConfig.model_rebuild(force=True)
    try:
        changed = load_config(ROOT / "configs" / "smoke.yaml", [f"storage_path={tmp_path}"])
        assert changed.train.weight_decay == 0.01
        after = RunState(changed.run_dir, changed)
        assert after.is_done("data") and after.is_done("chunk")            # they do not read train.*
        assert not after.is_done("train/std_cot") and not after.is_done("train/cwt")
        assert load_sweep(ROOT / "configs" / "sweep_smoke.yaml").fingerprint() != sweep_before
    finally:
        monkeypatch.undo()
        TrainConfig.model_rebuild(force=True)
        ExperimentConfig.model_rebuild(force=True)
    assert load_config(ROOT / "configs" / "smoke.yaml").train.weight_decay == 0.0


def test_the_pipeline_plans_stages_in_the_order_their_inputs_need():
    """Stages are equals in one list; the plan puts each (stage, method) after what it reads:
    skip data after the CWT student and before STT, which trains from both."""
    from cwt_ray.pipeline import STAGES, plan

    cfg = load_config(QUICKSTART)
    assert plan(cfg, STAGES) == [("data", None), ("chunk", None), ("train", "std_cot"), ("train", "cwt"),
                                 ("skip", None), ("train", "stt"), ("eval", "std_cot"), ("eval", "cwt"),
                                 ("eval", "stt"), ("report", None)]
    assert plan(cfg, ("train",)) == [("train", "std_cot"), ("train", "cwt"), ("skip", None), ("train", "stt")]
    assert plan(cfg, ("skip",)) == [("skip", None)]
    no_stt = load_config(QUICKSTART, ["methods=[std_cot,cwt]"])
    assert ("skip", None) not in plan(no_stt, STAGES)          # nothing would read it
    assert plan(no_stt, ("skip",)) == [("skip", None)]          # unless asked for by name
    assert plan(no_stt, ("eval",), eval_methods=["cwt"]) == [("eval", "cwt")]
