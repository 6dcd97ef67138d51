"""Issue 15 (multi-node): schedule lengths in fractional epochs or steps, resume at another world size, stop
signals that checkpoint before a time limit, and the torchrun / SLURM launch of stage 03."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from exaonepath_core.config import ConfigError, PretrainConfig, load_config
from exaonepath_core.config import ConfigError as ProjectConfigError
from exaonepath_core.data import patch_store
from exaonepath_core.pretrain import curves, elastic, launch, preemption, schedules
from exaonepath_core.pretrain import train as trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


# ---------------------------------------------------------------------------------------------------------------
# schedule lengths
# ---------------------------------------------------------------------------------------------------------------
def test_schedule_lengths_take_fractional_epochs_or_steps():
    assert schedules.parse_length("w", 10) == (10.0, "epochs")
    assert schedules.parse_length("w", "2500 steps") == (2500.0, "steps")
    assert schedules.parse_length("w", "1 step") == (1.0, "steps")
    assert schedules.parse_length("w", "0.25 epochs") == (0.25, "epochs")
    assert schedules.length_in_steps("w", 0.5, 7) == 4  # 3.5 rounded to even
    assert schedules.length_in_steps("w", 2, 7) == 14
    assert schedules.length_in_steps("w", "3 steps", 7) == 3
    for bad in ("12 hours", "2.5 steps", "-1 steps", True, -0.5):
        with pytest.raises(ValueError, match="w"):
            schedules.parse_length("w", bad)
    # the step-indexed schedules the epoch ones wrap: integer epochs give what they always gave
    assert np.array_equal(schedules.cosine_schedule(1.0, 0.1, 5, 7, warmup_epochs=2),
                          schedules.cosine_schedule_steps(1.0, 0.1, 35, 14))
    short = schedules.cosine_schedule(1.0, 0.0, 1.5, 4, warmup_epochs=0.5)  # 6 steps, 2 of warm-up
    assert len(short) == 6 and short[:2].tolist() == [0.0, 0.5] and short[2] == 1.0 and short[-1] == 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        schedules.cosine_schedule_steps(1.0, 0.0, 5, 6)


def test_pretrain_config_validates_schedule_lengths_naming_the_key():
    cfg = PretrainConfig(epochs=1.5, warmup_epochs="20 steps", freeze_last_layer=0.25,
                         warmup_teacher_temp_epochs="0.5 epochs")
    assert cfg.epochs == 1.5 and cfg.warmup_epochs == "20 steps"
    with pytest.raises(ConfigError, match="freeze_last_layer.*'2500 steps'"):
        PretrainConfig(freeze_last_layer="three epochs")
    with pytest.raises(ConfigError, match=r"warmup_epochs \(2.5\) must lie in \[0, epochs=2"):
        PretrainConfig(epochs=2, warmup_epochs=2.5)
    with pytest.raises(ProjectConfigError, match="pretrain.warmup_epochs: expected a number or a string"):
        load_config("smoke", {"pretrain.warmup_epochs": [1]})
    assert load_config("smoke", {"pretrain.warmup_epochs": "5 steps"}).pretrain["warmup_epochs"] == "5 steps"


def test_paper_profile_states_dinos_vit_b16_budget_in_images_seen():
    pretrain = load_config("paper").pretrain
    store = 285_153_903
    dino_images = 400 * 1_281_167
    assert pretrain["epochs"] * store == pytest.approx(dino_images, rel=1e-5)
    # DINO's fractions of its 400 epochs: lr warm-up 10, teacher temperature warm-up 50, last layer frozen 3
    for key, dino_epochs in (("warmup_epochs", 10), ("warmup_teacher_temp_epochs", 50), ("freeze_last_layer", 3)):
        assert pretrain[key] / pretrain["epochs"] == pytest.approx(dino_epochs / 400, rel=1e-3), key


# ---------------------------------------------------------------------------------------------------------------
# the data position at another world size
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "world", "batch"), [(40, 1, 4), (40, 2, 4), (41, 3, 4), (10, 4, 2)])
def test_rank_epoch_indices_are_todays_rank_indices_cut_to_whole_batches(n, world, batch):
    steps_per_epoch = -(-n // world) // batch
    for rank in range(world):
        today = patch_store.rank_indices(n, rank, world, seed=5, epoch=2)[: steps_per_epoch * batch]
        ours = elastic.rank_epoch_indices(n, rank, world, 5, 2, steps_per_epoch=steps_per_epoch, batch_size=batch,
                                          step=2 * steps_per_epoch)
        assert np.array_equal(ours, today)
        mid = elastic.rank_epoch_indices(n, rank, world, 5, 2, steps_per_epoch=steps_per_epoch, batch_size=batch,
                                         step=2 * steps_per_epoch + 1)
        assert np.array_equal(mid, today[batch:])


def _global_sequence(n, world, batch, seed, position, steps_per_epoch, steps):
    """The samples of `steps` global steps from `position`, in sequence order (ranks interleaved), per step."""
    out, step, pos = [], position.step, position
    while len(out) < steps:
        epoch = step // steps_per_epoch
        shares = [elastic.rank_epoch_indices(n, r, world, seed, epoch, steps_per_epoch=steps_per_epoch,
                                             batch_size=batch, step=step, offset=pos.offset_at(step, steps_per_epoch))
                  for r in range(world)]
        for k in range(len(shares[0]) // batch):
            if len(out) == steps:
                break
            batch_of_step = np.stack([s[k * batch:(k + 1) * batch] for s in shares], axis=1).reshape(-1)
            out.append(batch_of_step)  # rank r holds sequence positions r, r + W, ...: interleave to restore
            step += 1
    return out


def test_resume_from_one_to_two_ranks_continues_the_same_sample_sequence():
    n, batch, seed = 40, 4, 3
    single = np.concatenate(_global_sequence(n, 1, batch, seed, elastic.DataPosition(0, 0), 10, 14))
    assert np.array_equal(single[:40], elastic.epoch_order(n, seed, 0))  # one rank reads the permutation itself
    # 4 steps of 4 at one rank (16 samples seen), then two ranks (global batch 8, 5 steps per epoch)
    moved = elastic.remap_position(elastic.DataPosition(4, 0), n=n, old_steps_per_epoch=10, old_global_batch=4,
                                   new_steps_per_epoch=5, new_global_batch=8)
    assert moved.position == elastic.DataPosition(2, 0, 0, saved_step=4)
    assert (moved.samples_into_epoch, moved.unseen_in_epoch) == (16, 0)
    after = _global_sequence(n, 2, batch, seed, moved.position, 5, 5)
    assert np.array_equal(np.concatenate([single[:16], *after]), single[:56])
    # each step's two ranks read disjoint samples
    for step_batch in after:
        assert len(set(step_batch[0::2]) & set(step_batch[1::2])) == 0


@pytest.mark.parametrize("seed", range(6))
def test_remapped_positions_never_repeat_a_sample_and_skip_less_than_a_batch(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n, batch = int(rng.integers(8, 90)), int(rng.integers(1, 5))
        old_world, new_world = (int(w) for w in rng.integers(1, 5, size=2))
        old_spe, new_spe = (-(-n // w) // batch for w in (old_world, new_world))
        if min(old_spe, new_spe) == 0:
            continue
        saved = elastic.DataPosition(int(rng.integers(0, old_spe)), 0)
        moved = elastic.remap_position(saved, n=n, old_steps_per_epoch=old_spe, old_global_batch=old_world * batch,
                                       new_steps_per_epoch=new_spe, new_global_batch=new_world * batch)
        before = _global_sequence(n, old_world, batch, 9, elastic.DataPosition(0, 0), old_spe, saved.step)
        seen = np.concatenate([np.zeros(0, np.int64), *before])
        if moved.position.epoch == 0:
            rest = new_spe - moved.position.step
            seen = np.concatenate([seen, *_global_sequence(n, new_world, batch, 9, moved.position, new_spe, rest)])
        assert len(seen) <= max(n, new_spe * new_world * batch, old_spe * old_world * batch)
        if len(seen) <= n:  # a layout that pads the epoch (n not a multiple of world) may repeat, as today
            assert len(np.unique(seen)) == len(seen), (n, batch, old_world, new_world, saved)
        assert moved.unseen_in_epoch == max(0, n - len(seen))
        assert moved.unseen_in_epoch <= max(n - new_spe * new_world * batch, 0) + new_world * batch


# ---------------------------------------------------------------------------------------------------------------
# stop signals
# ---------------------------------------------------------------------------------------------------------------
def test_stop_request_sets_a_flag_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with preemption.StopRequest() as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.agreed() and stop.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


class _SignalAt(torch.utils.data.Dataset):
    """Random uint8 patches (pixels do not matter here) that send SIGUSR1 to this process at one read."""

    def __init__(self, n: int, signal_at_read: int | None) -> None:
        self.patches = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.signal_at_read, self.reads = signal_at_read, 0

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> np.ndarray:
        self.reads += 1
        if self.reads == self.signal_at_read:
            os.kill(os.getpid(), signal.SIGUSR1)
        return self.patches[index]


def _tiny(out: Path, **overrides) -> PretrainConfig:
    settings = {
        "arch": "vit_tiny_patch16_224", "patch_size": 8, "global_crop_size": 32, "local_crop_size": 16,
        "n_local_crops": 1, "out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "epochs": 1.5,
        "batch_size_per_gpu": 4, "lr": 0.002, "warmup_epochs": "2 steps", "freeze_last_layer": 0.25,
        "num_workers": 0, "seed": 3, "deterministic": True, "saveckp_freq": 100, "input_arm": "raw",
        "output_dir": str(out), "progress_bar": False, "fused_adamw": False,
    }
    settings.update(overrides)
    return PretrainConfig(**settings)


@pytest.mark.slow
def test_a_stop_signal_checkpoints_after_the_step_and_the_resume_matches_an_uninterrupted_run(tmp_path):
    full = trainer.train(_tiny(tmp_path / "full", max_steps=4), dataset=_SignalAt(24, None))
    assert full["total_steps"] == 9  # 1.5 epochs of 6 steps
    records = curves.read_log(tmp_path / "full" / "log.jsonl")
    base = 0.002 * 4 / 256
    assert [r["lr"] for r in records[:3]] == pytest.approx([0.0, base / 2, base])  # "2 steps" of warm-up

    out = tmp_path / "stopped"
    with pytest.raises(preemption.Preempted, match="SIGUSR1 after step 2"):
        trainer.train(_tiny(out, max_steps=4), dataset=_SignalAt(24, 6))  # read 6 is in step 2
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["global_batch"] == 4 and checkpoint["epoch_offset"] == 0
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored after the run
    resumed = trainer.train(_tiny(out, max_steps=4), resume=True, dataset=_SignalAt(24, None))
    assert (resumed["start_step"], resumed["steps"]) == (2, 4)
    assert [r["loss"] for r in curves.read_log(out / "log.jsonl")] == [r["loss"] for r in records]


@pytest.mark.slow
def test_sigterm_to_a_real_trainer_process_writes_a_checkpoint_and_exits_75(shared_data, tmp_path):
    """A trainer subprocess sent SIGTERM mid-run: exit 75, checkpoint at the last logged step, resume continues."""
    from test_training import _tiny_config, _write_raw_store  # tests/ is on sys.path (pytest rootdir)

    store = _write_raw_store(shared_data, tmp_path / "store", 20)

    def start(out: Path, *extra: str) -> subprocess.Popen:
        config = tmp_path / f"{out.name}.yaml"
        config.write_text(yaml.safe_dump(_tiny_config(store, out, max_steps=60).to_dict()))
        return subprocess.Popen([sys.executable, "-m", "exaonepath_core.pretrain.cli", "--config", str(config), *extra],
                                cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    out = tmp_path / "stopped"
    proc = start(out)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and
                                                                  len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == preemption.EXIT_PREEMPTED, stderr[-2000:]
    assert "SIGTERM received" in stderr and "rerun with --resume" in stderr
    stopped_at = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["step"]
    assert 2 <= stopped_at < 60 and len(curves.read_log(log)) == stopped_at
    resumed = start(out, "--resume", "--set", f"max_steps={stopped_at + 2}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    reference = start(tmp_path / "reference", "--set", f"max_steps={stopped_at + 2}")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    for proc_ in (resumed, reference):
        proc_.stdout.close()
        proc_.stderr.close()
    losses = [r["loss"] for r in curves.read_log(log)]
    assert losses == [r["loss"] for r in curves.read_log(tmp_path / "reference" / "log.jsonl")]
    assert len(losses) == stopped_at + 2


# ---------------------------------------------------------------------------------------------------------------
# launch: torchrun command, SLURM template, two "nodes" on localhost
# ---------------------------------------------------------------------------------------------------------------
def test_torchrun_command_single_node_unchanged_multi_node_rendezvous():
    args = ["--config", "p.yaml"]
    assert launch.torchrun_command(args, python="py") == ["py", "-m", "exaonepath_core.pretrain.cli", *args]
    assert launch.torchrun_command(args, nproc_per_node=8, python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8",
        "-m", "exaonepath_core.pretrain.cli", *args]
    multi = launch.torchrun_command(args, nproc_per_node=8, nnodes=4, rdzv_endpoint="node001:29500",
                                    rdzv_id="1234", python="py")
    assert multi[:8] == ["py", "-m", "torch.distributed.run", "--nnodes=4", "--nproc_per_node=8",
                         "--rdzv_backend=c10d", "--rdzv_endpoint=node001:29500", "--rdzv_id=1234"]
    assert "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in multi
    assert multi[-4:] == ["-m", "exaonepath_core.pretrain.cli", *args]
    with pytest.raises(launch.LaunchError, match="rdzv_endpoint"):
        launch.torchrun_command(args, nnodes=2)
    with pytest.raises(launch.LaunchError, match="HOST:PORT"):
        launch.torchrun_command(args, nnodes=2, rdzv_endpoint="node001")
    with pytest.raises(ProjectConfigError, match="config key rdzv_endpoint"):
        load_config("smoke", {"nnodes": 2})
    with pytest.raises(ProjectConfigError, match="config key nnodes: must be > 0"):
        load_config("smoke", {"nnodes": 0})
    assert load_config("smoke", {"nnodes": 2, "rdzv_endpoint": "10.0.0.1:29500"}).nnodes == 2


def test_slurm_template_requeues_on_usr1_and_launches_one_torchrun_per_node(tmp_path, capsys):
    template = REPO_ROOT / "tools" / "slurm" / "pretrain.sbatch"
    text = template.read_text()
    for line in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1",
                 "trap forward_stop USR1", 'scancel --signal=USR1 "$SLURM_JOB_ID"', 'scontrol requeue "$SLURM_JOB_ID"',
                 "-m exaonepath_core.pretrain.launch", '--rdzv-endpoint "$MASTER:$RDZV_PORT"', '--nnodes "$SLURM_NNODES"'):
        assert line in text, line
    assert subprocess.run(["bash", "-n", str(template)], check=False).returncode == 0
    config = tmp_path / "pretrain.yaml"
    config.write_text("epochs: 1\n")
    assert launch.main(["--config", str(config), "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint",
                        "node1:29500", "--rdzv-id", "77", "--dry-run", "--", "--set", "max_steps=3"]) == 0
    printed = capsys.readouterr().out
    assert "--rdzv_endpoint=node1:29500" in printed and printed.rstrip().endswith(
        f"--config {config} --resume --set max_steps=3")
    assert launch.main(["--config", str(config), "--nnodes", "2", "--dry-run"]) == 2  # no endpoint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_RECORDING_TRAINER = '''
import json, os, sys
import numpy as np, torch
from exaonepath_core.pretrain import curves, train as trainer
from exaonepath_core.config import PretrainConfig

class Recording(torch.utils.data.Dataset):
    def __init__(self):
        self.patches = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
        self.seen = []
    def __len__(self):
        return len(self.patches)
    def __getitem__(self, index):
        self.seen.append(int(index))
        return self.patches[index]

config, label, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
dataset = Recording()
cfg = PretrainConfig.from_yaml(config).with_overrides(sys.argv[4:])
trainer.train(cfg, resume=resume, dataset=dataset)
with open(os.path.join(cfg.output_dir, f"seen_{label}_rank{os.environ.get('RANK', '0')}.json"), "w") as handle:
    json.dump(dataset.seen, handle)
'''


@pytest.mark.slow
def test_two_nodes_on_localhost_resume_a_one_rank_run_with_the_same_sample_sequence(tmp_path):
    """One rank trains 4 steps; two torchrun 'nodes' (c10d rendezvous on 127.0.0.1) continue the same epoch."""
    out = tmp_path / "run"
    out.mkdir()
    config = out / "pretrain.yaml"
    config.write_text(yaml.safe_dump(_tiny(out, epochs=2, warmup_epochs=0.5).to_dict()))
    script = tmp_path / "recording_trainer.py"
    script.write_text(_RECORDING_TRAINER)
    first = subprocess.run([sys.executable, str(script), str(config), "one", "fresh", "max_steps=4"],
                           cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    endpoint = f"127.0.0.1:{_free_port()}"
    command = launch.torchrun_command([str(config), "two", "resume", "max_steps=7"], nnodes=2,
                                      rdzv_endpoint=endpoint, rdzv_id="localtest", entry=[str(script)])
    nodes = [subprocess.Popen(command, cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert any("world size changed 1 -> 2" in o and "step 4 -> 2" in o for o in outputs), outputs
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert (checkpoint["world_size"], checkpoint["step"], checkpoint["global_batch"]) == (2, 7, 8)

    # the loader fetches one batch past max_steps before the loop stops: only the trained batches count
    one = json.loads((out / "seen_one_rank0.json").read_text())[:16]
    ranks = [np.array(json.loads((out / f"seen_two_rank{r}.json").read_text())).reshape(-1, 4)[:5] for r in (0, 1)]
    assert all(len(set(a) & set(b)) == 0 for a, b in zip(*ranks))  # disjoint within every step
    two = np.stack(ranks, axis=2).reshape(-1).tolist()  # rank r read positions r, r + 2, ...: interleave
    expected = np.concatenate([elastic.epoch_order(40, 3, 0), elastic.epoch_order(40, 3, 1)])
    assert one == expected[:16].tolist() and two == expected[16:56].tolist()
    assert [r["step"] for r in curves.read_log(out / "log.jsonl")] == [1, 2, 3, 4, 3, 4, 5, 6, 7]


_SHIMS = {  # stand-ins for SLURM's commands: enough for the batch script's own logic to run on this machine
    "scontrol": 'case "$1" in show) echo 127.0.0.1 ;; *) echo "scontrol $*" >> "$SHIM_DIR/calls" ;; esac\n',
    "scancel": 'echo "scancel $*" >> "$SHIM_DIR/calls"\nkill -USR1 -- "-$(cat "$SHIM_DIR/srun.pid")"\n',
    # srun: drop its options, run the task as a process-group leader (as slurmstepd would signal the task)
    "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\necho $$ > "$SHIM_DIR/srun.pid"\nexec setsid "$@"\n',
}


@pytest.mark.slow
def test_sbatch_script_on_usr1_checkpoints_through_torchrun_and_requeues(shared_data, tmp_path):
    """The batch script run with SLURM's commands stubbed: USR1 reaches the trainer via torchrun, which
    checkpoints after its step, and the script requeues the job."""
    from test_training import _tiny_config, _write_raw_store  # tests/ is on sys.path (pytest rootdir)

    store = _write_raw_store(shared_data, tmp_path / "store", 20)
    out = tmp_path / "run"
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(store, out, max_steps=60).to_dict()))
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, body in _SHIMS.items():
        (shims / name).write_text("#!/bin/bash\n" + body)
        (shims / name).chmod(0o755)
    env = {**SUBPROCESS_ENV, "PATH": f"{shims}:{os.environ['PATH']}", "SHIM_DIR": str(shims),
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "GPUS_PER_NODE": "1",
           "RDZV_PORT": str(_free_port()), "EXAONEPATH_REPO": str(REPO_ROOT), "EXAONEPATH_PYTHON": sys.executable}
    job = subprocess.Popen(["bash", str(REPO_ROOT / "tools" / "slurm" / "pretrain.sbatch"), str(config)], env=env,
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and not (log.is_file() and
                                                                 len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0, output[-3000:]
    calls = (shims / "calls").read_text()
    assert "scancel --signal=USR1 4242" in calls and "scontrol requeue 4242" in calls, calls
    assert "SIGUSR1 received" in output and "requeueing job 4242" in output, output[-3000:]
    stopped_at = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["step"]
    assert 2 <= stopped_at < 60 and len(curves.read_log(log)) == stopped_at
    assert not (out / "teacher_backbone.pth").exists()  # stopped, not finished
