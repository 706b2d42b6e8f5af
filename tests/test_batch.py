"""`dreamlab batch`: prompt-file parsing with per-row errors, the manifest and gallery, resume
after SIGKILL mid-batch, and the Ray path giving the same files as the local one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreamlab.batch import plan_jobs, read_rows
from dreamlab.cli import UserError, main

FAST = ["--gaussians", "300", "--resolution", "32", "--faces", "600", "--texture-size", "64", "--quiet"]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _by_name(out: Path) -> dict:
    return {a["name"]: a for a in _manifest(out)["assets"]}


def test_malformed_rows_are_recorded_and_the_rest_run(tmp_path: Path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a red cube", "steps": 4}\n'
        '{"prompt": "a red dragon"}\n'  # unknown word
        '{"prompt": "a blue sphere", "steps": 4\n'  # bad JSON
        '{"name": "x"}\n'  # no prompt
        '{"prompt": "a torus", "colour": "red"}\n'  # unknown field
        '{"prompt": "a green cone", "steps": "many"}\n'  # bad value
        '{"prompt": "a green cone", "name": "a-red-cube", "steps": 4}\n'  # duplicate name
        '{"prompt": "a torus", "name": "../escape"}\n'  # not a folder name
        '"a yellow cone"\n'
    )
    out = tmp_path / "out"
    code = main(["batch", str(prompts), "--out", str(out), "--steps", "4", "--formats", "glb", "png", *FAST])
    assert code == 1  # not every row succeeded
    assets = _manifest(out)["assets"]
    assert [a["row"] for a in assets] == list(range(1, 10))
    status = {a["row"]: (a["status"], a["reason"] or "") for a in assets}
    assert status[1][0] == "done" and status[9][0] == "done"
    assert "does not know 'dragon'" in status[2][1]
    assert "bad JSON" in status[3][1]
    assert "missing column 'prompt'" in status[4][1]
    assert "unknown field(s) colour" in status[5][1]
    assert "steps must be int" in status[6][1]
    assert "duplicate name 'a-red-cube'" in status[7][1]
    assert "not a plain folder name" in status[8][1]
    assert all(s == "failed" for row, (s, _) in status.items() if row not in (1, 9))
    assert not (tmp_path / "escape").exists() and not (out / "a-red-dragon").exists()
    assert (out / "a-red-cube" / "model.glb").read_bytes()[:4] == b"glTF"
    gallery = (out / "index.html").read_text()
    assert 'src="a-red-cube/preview.png"' in gallery and "does not know" in gallery
    err = capsys.readouterr().err
    assert "2 of 9 assets done" in err and "Traceback" not in err


def test_csv_columns_and_seeds(tmp_path: Path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,name,seed\na red cube,cube,\na blue sphere,ball,7\na torus\n")
    rows = read_rows(prompts)
    assert rows[0].values == {"prompt": "a red cube", "name": "cube"}
    assert rows[1].values["seed"] == 7
    assert rows[2].error and "missing column(s) name, seed" in rows[2].error
    jobs = plan_jobs(rows, [0, 1])
    assert [(j.name, j.seed) for j in jobs if j.error is None] == [("cube-seed0", 0), ("cube-seed1", 1), ("ball", 7)]
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("text,name\na red cube,c\n")
    with pytest.raises(UserError, match="no 'prompt' column"):
        read_rows(bad_header)


@pytest.mark.parametrize(
    "content, suffix, message",
    [("", ".txt", "holds no prompts"), ("a red cube", ".yaml", "must end in .txt, .jsonl or .csv")],
)
def test_unusable_prompt_files_exit_2(tmp_path: Path, content, suffix, message, capsys):
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    assert main(["batch", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from dreamlab.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def test_resume_after_sigkill_mid_batch(tmp_path: Path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--out", str(out), "--steps", "40", "--checkpoint-every", "10",
            "--formats", "ply", "png", *FAST]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cli(args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "a-blue-sphere" / "checkpoints" / "step_0000010.pt"
    deadline = time.time() + 300
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert second.exists(), "the batch never reached the second asset's first checkpoint"
    assert (out / "a-red-cube" / "result.json").exists()
    assert not (out / "a-blue-sphere" / "result.json").exists()
    first_ply = (out / "a-red-cube" / "splats.ply").stat().st_mtime_ns

    again = subprocess.run(_cli(args), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assets = _by_name(out)
    assert assets["a-red-cube"]["reused"] is True
    assert (out / "a-red-cube" / "splats.ply").stat().st_mtime_ns == first_ply  # not redone
    assert assets["a-blue-sphere"]["status"] == "done"
    assert assets["a-blue-sphere"]["resumed_from_step"] >= 10
    assert (out / "a-blue-sphere" / "splats.ply").exists()


def test_finished_asset_with_other_settings_is_not_reused(tmp_path: Path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    out = tmp_path / "out"
    common = ["batch", str(prompts), "--out", str(out), "--formats", "png", *FAST]
    assert main([*common, "--steps", "3"]) == 0
    assert main([*common, "--steps", "4"]) == 1
    reason = _by_name(out)["a-red-cube"]["reason"]
    assert "other settings" in reason and "steps 3 vs 4" in reason


def test_ray_path_gives_the_same_files_as_the_local_path(tmp_path: Path):
    import ray  # part of the test extras: pip install -e ".[test]"

    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,seed\na red cube,\na blue sphere,3\n")
    common = ["--steps", "6", "--seeds", "0,1", "--formats", "ply", "png", *FAST]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray tasks run with --ray-cpus 1 = 1 torch thread
    try:
        assert main(["batch", str(prompts), "--out", str(tmp_path / "local"), *common]) == 0
    finally:
        torch.set_num_threads(threads)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    try:
        assert main(["batch", str(prompts), "--out", str(tmp_path / "ray"), "--ray", *common]) == 0
    finally:
        ray.shutdown()
    names = sorted(a["name"] for a in _manifest(tmp_path / "local")["assets"])
    assert names == ["a-blue-sphere", "a-red-cube-seed0", "a-red-cube-seed1"]
    assert sorted(_by_name(tmp_path / "ray")) == names
    for name in names:
        local = (tmp_path / "local" / name / "splats.ply").read_bytes()
        assert local == (tmp_path / "ray" / name / "splats.ply").read_bytes(), name
    assert (tmp_path / "local" / "a-red-cube-seed0" / "splats.ply").read_bytes() != (
        tmp_path / "local" / "a-red-cube-seed1" / "splats.ply").read_bytes()


def test_only_complete_results_count_as_finished(tmp_path: Path):
    from dreamlab.generation import RESULT_FILE, read_result

    def write(steps: int, total: int) -> None:
        (tmp_path / RESULT_FILE).write_text(json.dumps({"files": ["model.glb"], "steps": steps,
                                                        "settings": {"steps": total}}))

    write(40, 40)
    assert read_result(tmp_path)["steps"] == 40
    write(12, 40)  # a cancelled UI job exports what it has: not finished
    assert read_result(tmp_path) is None
    (tmp_path / RESULT_FILE).write_text("{not json")
    assert read_result(tmp_path) is None


def test_batch_renderer_options_reach_each_job(tmp_path: Path):
    from dreamlab.batch import job_generate_args
    from dreamlab.cli import _parse, build_run_config

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red cube"}\n{"prompt": "a blue cube", "renderer": "gaussians"}\n')
    batch = _parse(["batch", str(prompts), "--out", str(tmp_path / "out"), "--renderer", "nerf",
                    "--nerf.num-samples", "12", "--nerf.shading", "textureless"])
    nerf_job, gaussian_job = plan_jobs(read_rows(prompts), [0])
    cfg = build_run_config(job_generate_args(nerf_job, batch))
    assert cfg.renderer.num_samples == 12 and cfg.renderer.shading == "textureless"
    # a row that picks another renderer does not get the batch renderer's options
    assert not hasattr(build_run_config(job_generate_args(gaussian_job, batch)).renderer, "num_samples")
