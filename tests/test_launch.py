"""Tests of the launch scripts (launch/*.sh, launch/slurm.sbatch).

Nothing here touches a cloud or a cluster: `--dry-run` output is parsed back into
argument lists with shlex and compared word for word; the create/reuse/preemption
logic of tpu_pod.sh runs against a fake `gcloud` on PATH that records its calls and
keeps the slice's state in a file; slurm.sbatch runs against a fake `srun`.
"""
import importlib
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
TPU = os.path.join(LAUNCH, "tpu_pod.sh")
GPU = os.path.join(LAUNCH, "gpu_local.sh")
SLURM = os.path.join(LAUNCH, "slurm.sbatch")
PAPER = os.path.join(LAUNCH, "paper.sh")
SCRIPTS = [TPU, GPU, SLURM, PAPER, os.path.join(LAUNCH, "common.sh")]

USER_CMD = ["python", "-m", "rrcm_jax.pretrain",
            "--config=configs/imagenet_pretrain_rcmb.py", "--workdir=gs://b/run",
            "--config.note=it's a test"]   # a quote and a space survive the trip
BASE = ["--name", "rrcm-b", "--zone", "us-east5-a", "--accelerator-type", "v5p-64"]

# The paper rows' config files (sigma=SIGMA with SIGMA in 0.25/0.5/1.0 for the σ-dependent ones).
PRETRAIN_CONFIGS = {"configs/cifar10_pretrain_rcmb.py", "configs/imagenet_pretrain_rcmb.py",
                    "configs/imagenet_pretrain_rcms.py"}
SIGMAS = ("0.25", "0.5", "1.0")
FINETUNE_CONFIGS = {f"configs/{d}_finetune.py:sigma={s}" for d in ("cifar10", "imagenet")
                    for s in SIGMAS}
CERTIFY_CONFIGS = {f"configs/{d}_certify.py:sigma={s}" for d in ("cifar10", "imagenet")
                   for s in SIGMAS}
DDS_CONFIGS = {f"configs/{d}_dds_certify.py:sigma={s}" for d in ("cifar10", "imagenet")
               for s in SIGMAS}
DDS_FILES = {"cifar10": ("cifar10_uncond_50M_500K.pt",
                         "vit-base-patch16-224-in21k-finetuned-cifar10/model.safetensors"),
             "imagenet": ("256x256_diffusion_uncond.pt", "beit_large_patch16_512/model.safetensors")}


def run(args, env=None, cwd=REPO):
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run(["bash", *args], capture_output=True, text=True, env=full_env,
                        cwd=cwd, timeout=60)


def commands(stdout):
  """Dry-run output -> list of argument lists (notes starting with '#' dropped)."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def flag(cmd, name):
  values = [w[len(name) + 1:] for w in cmd if w.startswith(name + "=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


def user_command(remote):
  """The user's command words inside the remote `{ ...; }` group of the run step."""
  match = re.search(r"\{ (.*); \} 2>&1 \| tee -a ~/rrcm-logs/worker-\"\$\(hostname\)\"\.log$", remote)
  assert match, remote
  return shlex.split(match.group(1))


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
  result = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------- tpu_pod.sh, dry run

def test_tpu_dry_run_spot_commands():
  result = run([TPU, *BASE, "--spot", "--project", "proj", "--env", "TFDS_DATA_DIR=gs://b/tfds",
                "--dry-run", "--", *USER_CMD])
  assert result.returncode == 0, result.stderr
  create, scp, install, launch = commands(result.stdout)
  where = ["--zone=us-east5-a", "--project=proj"]
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rrcm-b", *where,
                    "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"]
  archive = os.path.join(os.environ.get("TMPDIR", "/tmp"), "rrcm-jax-rrcm-b.tar.gz")
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "rrcm-b:rrcm-jax.tar.gz",
                 *where, "--worker=all"]
  assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rrcm-b"]
  assert install[6:9] == [*where, "--worker=all"]
  setup = flag(install, "--command")
  assert "tar -xzf ~/rrcm-jax.tar.gz -C ~/rrcm-jax" in setup
  # Installs keep to the versions the tests passed with.
  assert 'pip install -c requirements/constraints.txt "jax[tpu]"' in setup
  assert 'pip install -c requirements/constraints.txt -e ".[data]"' in setup
  assert launch[:9] == install[:9]
  assert flag(launch, "--output-directory") == "logs/rrcm-b"
  remote = flag(launch, "--command")
  assert "export PATH=\"$HOME/.local/bin:$PATH\" RRCM_DISTRIBUTED=1 TFDS_DATA_DIR=gs://b/tfds;" in remote
  assert "cd ~/rrcm-jax;" in remote
  assert user_command(remote) == USER_CMD


def test_tpu_remote_commands_run_in_bash(tmp_path):
  """The worker-side scripts parse, and the run step delivers the command intact."""
  probe = ["python3", "-c", "import os, sys; print(os.environ['RRCM_DISTRIBUTED'], sys.argv[1:])",
           "it's a test"]
  result = run([TPU, *BASE, "--dry-run", "--", *probe])
  _, _, install, launch = commands(result.stdout)
  syntax = subprocess.run(["bash", "-n", "-c", flag(install, "--command")], capture_output=True)
  assert syntax.returncode == 0, syntax.stderr
  (tmp_path / "rrcm-jax").mkdir()
  worker = subprocess.run(["bash", "-c", flag(launch, "--command")], capture_output=True, text=True,
                          env=dict(os.environ, HOME=str(tmp_path)), timeout=60)
  assert worker.returncode == 0, worker.stderr
  assert worker.stdout.strip() == "1 [\"it's a test\"]"
  (log,) = (tmp_path / "rrcm-logs").iterdir()
  assert log.name.startswith("worker-") and log.read_text() == worker.stdout


def test_tpu_dry_run_preemptible_and_version():
  result = run([TPU, "--name", "x", "--zone", "z", "--accelerator-type", "v4-32", "--preemptible",
                "--version", "tpu-ubuntu2204-base", "--dry-run", "--", "true"])
  assert result.returncode == 0, result.stderr
  create = commands(result.stdout)[0]
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "x", "--zone=z",
                    "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--preemptible"]


@pytest.mark.parametrize("accel,version", [("v6e-32", "v2-alpha-tpuv6e"),
                                           ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v4-8", "tpu-ubuntu2204-base")])
def test_tpu_default_version_follows_type(accel, version):
  result = run([TPU, "--name", "x", "--zone", "z", "--accelerator-type", accel, "--dry-run", "--", "true"])
  assert result.returncode == 0, result.stderr
  assert flag(commands(result.stdout)[0], "--version") == version


def test_tpu_dry_run_queued_spot():
  result = run([TPU, *BASE, "--queued", "--spot", "--dry-run", "--", *USER_CMD])
  assert result.returncode == 0, result.stderr
  create = commands(result.stdout)[0]
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "rrcm-b",
                    "--zone=us-east5-a", "--node-id=rrcm-b", "--accelerator-type=v5p-64",
                    "--runtime-version=v2-alpha-tpuv5", "--spot"]
  assert "# wait until queued resource rrcm-b is ACTIVE" in result.stdout
  assert all("tpu-vm create" not in " ".join(c) for c in commands(result.stdout))


def test_tpu_dry_run_reuse_and_repo():
  result = run([TPU, "--name", "rrcm-b", "--zone", "z", "--reuse", "--repo",
                "https://github.com/me/rrcm-jax.git", "--dry-run", "--", *USER_CMD])
  assert result.returncode == 0, result.stderr
  install, launch = commands(result.stdout)   # no create, no scp
  assert install[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in install
  assert "git clone https://github.com/me/rrcm-jax.git ~/rrcm-jax" in flag(install, "--command")
  assert user_command(flag(launch, "--command")) == USER_CMD


@pytest.mark.parametrize("args,names", [
    (["--zone", "z", "--accelerator-type", "v5p-8", "--", "x"], "--name"),
    (["--name", "Bad_Name", "--zone", "z", "--accelerator-type", "v5p-8", "--", "x"], "--name"),
    (["--name", "a", "--accelerator-type", "v5p-8", "--", "x"], "--zone"),
    (["--name", "a", "--zone", "z", "--", "x"], "--accelerator-type"),
    (["--name", "a", "--zone", "z", "--accelerator-type", "gpu-8", "--", "x"], "--accelerator-type"),
    ([*BASE, "--spot", "--preemptible", "--", "x"], "--preemptible"),
    ([*BASE, "--queued", "--preemptible", "--", "x"], "--queued"),
    ([*BASE, "--repo", "u", "--copy", "--", "x"], "--copy"),
    ([*BASE, "--env", "NOT-A-KEY=1", "--", "x"], "--env"),
    ([*BASE, "--max-restarts", "two", "--", "x"], "--max-restarts"),
    ([*BASE, "--zone"], "--zone"),
    ([*BASE, "--bogus", "--", "x"], "--bogus"),
    (BASE, "command"),
])
def test_tpu_bad_arguments(args, names):
  result = run([TPU, *args, "--dry-run"])
  assert result.returncode == 2
  assert result.stdout == ""
  message = result.stderr.strip()
  assert message.startswith("tpu_pod.sh: ") and "\n" not in message, message
  assert names in message


# ------------------------------------------------- tpu_pod.sh against a fake gcloud

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records each call; keeps the slice state in $FAKE_DIR/state.
printf '%q ' "$@" >> "$FAKE_DIR/calls"; echo >> "$FAKE_DIR/calls"
verb="$3 $4"
case $verb in
  "tpu-vm describe"|"queued-resources describe")
    [[ -f $FAKE_DIR/state ]] || { echo "NOT_FOUND" >&2; exit 1; }
    cat "$FAKE_DIR/state" ;;
  "tpu-vm create") echo READY > "$FAKE_DIR/state" ;;
  "queued-resources create") echo ACTIVE > "$FAKE_DIR/state" ;;
  "tpu-vm delete"|"queued-resources delete") rm -f "$FAKE_DIR/state" ;;
  "tpu-vm scp") cp "$5" "$FAKE_DIR/archive.tar.gz" ;;
  "tpu-vm ssh")
    if [[ "$*" == *RRCM_DISTRIBUTED=1* && -f $FAKE_DIR/fail_once ]]; then
      rm "$FAKE_DIR/fail_once"; echo PREEMPTED > "$FAKE_DIR/state"; exit 255
    fi
    if [[ "$*" == *RRCM_DISTRIBUTED=1* && -f $FAKE_DIR/exit_once ]]; then
      code=$(cat "$FAKE_DIR/exit_once"); rm "$FAKE_DIR/exit_once"; exit "$code"
    fi ;;
esac
"""


@pytest.fixture()
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
         "RRCM_POLL_SECONDS": "0", "TMPDIR": str(tmp_path)}

  def calls():
    path = tmp_path / "calls"
    lines = path.read_text().splitlines() if path.exists() else []
    return [" ".join(shlex.split(line)[2:4]) for line in lines]   # e.g. "tpu-vm create"
  return tmp_path, env, calls


def test_tpu_fresh_slice_is_created_shipped_and_run(fake_gcloud):
  tmp, env, calls = fake_gcloud
  result = run([TPU, *BASE, "--spot", "--log-dir", str(tmp / "logs"), "--", "true"], env=env)
  assert result.returncode == 0, result.stderr
  assert calls() == ["tpu-vm describe", "tpu-vm create", "tpu-vm describe",
                     "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  assert (tmp / "logs").is_dir()
  with tarfile.open(tmp / "archive.tar.gz") as archive:
    names = set(archive.getnames())
  assert "launch/tpu_pod.sh" in names
  assert not any(n.startswith((".venv/", ".git/")) for n in names)
  assert not os.path.exists(tmp / "rrcm-jax-rrcm-b.tar.gz")   # local archive removed


def test_tpu_archive_records_the_commit_for_runs_jsonl(fake_gcloud):
  tmp, env, _ = fake_gcloud
  result = run([TPU, *BASE, "--log-dir", str(tmp / "logs"), "--", "true"], env=env)
  assert result.returncode == 0, result.stderr
  tree = tmp / "worker"
  with tarfile.open(tmp / "archive.tar.gz") as archive:
    archive.extractall(tree, filter="data")
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                        check=True).stdout.strip()
  shipped = (tree / "CODE_VERSION").read_text().strip()
  assert shipped.removesuffix("+dirty") == head
  # On the worker there is no .git: the run record takes the shipped commit.
  probe = subprocess.run([sys.executable, "-c", "from rrcm_jax import workdir; "
                          "print(workdir.code_version())"], cwd=tree, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(tree)), check=True)
  assert probe.stdout.strip() == shipped


def test_tpu_ready_slice_is_reused(fake_gcloud):
  tmp, env, calls = fake_gcloud
  (tmp / "state").write_text("READY\n")
  result = run([TPU, *BASE, "--log-dir", str(tmp / "logs"), "--", "true"], env=env)
  assert result.returncode == 0, result.stderr
  assert calls() == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]


def test_tpu_preempted_slice_is_recreated(fake_gcloud):
  tmp, env, calls = fake_gcloud
  (tmp / "state").write_text("PREEMPTED\n")
  result = run([TPU, *BASE, "--spot", "--log-dir", str(tmp / "logs"), "--", "true"], env=env)
  assert result.returncode == 0, result.stderr
  assert calls()[:4] == ["tpu-vm describe", "tpu-vm delete", "tpu-vm describe", "tpu-vm create"]


def test_tpu_suspended_queued_resource_is_requeued(fake_gcloud):
  tmp, env, calls = fake_gcloud
  (tmp / "state").write_text("SUSPENDED\n")
  result = run([TPU, *BASE, "--queued", "--spot", "--log-dir", str(tmp / "logs"), "--", "true"],
               env=env)
  assert result.returncode == 0, result.stderr
  assert calls()[:5] == ["queued-resources describe", "queued-resources delete",
                         "queued-resources describe", "queued-resources create",
                         "queued-resources describe"]


def test_tpu_failed_run_restarts_or_reports(fake_gcloud):
  tmp, env, calls = fake_gcloud
  (tmp / "fail_once").touch()
  result = run([TPU, *BASE, "--spot", "--log-dir", str(tmp / "logs"), "--", "true"], env=env)
  assert result.returncode == 255
  assert "run the same launch again to resume" in result.stderr
  (tmp / "calls").unlink()
  (tmp / "state").write_text("READY\n")
  (tmp / "fail_once").touch()
  result = run([TPU, *BASE, "--spot", "--max-restarts", "1", "--log-dir", str(tmp / "logs"),
                "--", "true"], env=env)
  assert result.returncode == 0, result.stderr
  assert calls().count("tpu-vm create") == 1 and calls().count("tpu-vm delete") == 1
  assert calls()[-1] == "tpu-vm ssh"


def test_tpu_preempted_command_is_resumed(fake_gcloud):
  tmp, env, calls = fake_gcloud
  (tmp / "state").write_text("READY\n")
  (tmp / "exit_once").write_text("75")
  result = run([TPU, *BASE, "--log-dir", str(tmp / "logs"), "--", "true"], env=env)
  assert result.returncode == 0, result.stderr
  assert calls().count("tpu-vm ssh") == 4   # install and run, twice
  assert "preempted (exit 75, checkpoint written); running it again to resume" in result.stderr
  (tmp / "exit_once").write_text("75")
  result = run([TPU, *BASE, "--max-resumes", "0", "--log-dir", str(tmp / "logs"), "--", "true"],
               env=env)
  assert result.returncode == 75 and "run the same launch again to resume" in result.stderr


@pytest.mark.parametrize("status", [2, 65, 69])
def test_tpu_statuses_that_a_rerun_cannot_cure_stop_at_once(fake_gcloud, status):
  tmp, env, calls = fake_gcloud
  (tmp / "state").write_text("READY\n")
  (tmp / "exit_once").write_text(str(status))
  result = run([TPU, *BASE, "--max-restarts", "3", "--log-dir", str(tmp / "logs"), "--", "true"],
               env=env)
  assert result.returncode == status
  assert calls().count("tpu-vm ssh") == 2 and "tpu-vm create" not in calls()
  assert f"exit status {status}" in result.stderr and "rerunning cannot help" in result.stderr


# ---------------------------------------------------------------- exit statuses of a command

def _exits_then_succeeds(tmp_path, first_status):
  """A command that exits `first_status` on its first run and 0 after; counts its runs."""
  script = tmp_path / "stage.sh"
  script.write_text(f'#!/usr/bin/env bash\necho run >> "{tmp_path}/runs"\n'
                    f'[[ -f "{tmp_path}/ran" ]] && exit 0\ntouch "{tmp_path}/ran"\n'
                    f'exit {first_status}\n')
  script.chmod(0o755)
  return str(script), lambda: len((tmp_path / "runs").read_text().splitlines())


def test_gpu_preempted_command_is_resumed_only_when_asked(tmp_path):
  command, runs = _exits_then_succeeds(tmp_path, 75)
  result = run([GPU, "--", command])
  assert result.returncode == 75 and runs() == 1
  assert "preempted (exit 75, checkpoint written); run the same launch again" in result.stderr
  (tmp_path / "ran").unlink()
  result = run([GPU, "--max-resumes", "2", "--", command])
  assert result.returncode == 0, result.stderr
  assert runs() == 3 and "running it again to resume (1 of at most 2)" in result.stderr


def test_gpu_failure_is_reported_once_and_not_rerun(tmp_path):
  command, runs = _exits_then_succeeds(tmp_path, 2)
  result = run([GPU, "--max-resumes", "3", "--", command])
  assert result.returncode == 2 and runs() == 1
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("gpu_local.sh: the command failed with exit status 2 (bad input")


def test_gpu_passes_sigterm_on_to_the_command(tmp_path):
  trainer = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
  # Several times: the command often exits before the script looks at it again, and its
  # status must still be the one returned (a script that read the interrupted `wait`'s
  # 143 instead failed about one try in ten on two busy cores).
  for _ in range(8):
    proc = subprocess.Popen(["bash", GPU, "--max-resumes", "5", "--", sys.executable, "-c",
                             trainer], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "running it again" not in err   # signalled: no rerun


def test_gpu_passes_sigint_on_to_the_command():
  trainer = ("import signal, sys, time\n"
             "print('ready', flush=True)\n"
             "try:\n"
             "  time.sleep(60)\n"
             "except KeyboardInterrupt:\n"
             "  sys.exit(130)\n")
  proc = subprocess.Popen(["bash", GPU, "--", sys.executable, "-c", trainer],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "ready"
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=30)   # a command that ignored it would sleep on
  assert proc.returncode == 130, err


def _fake_slurm(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  srun = bin_dir / "srun"
  srun.write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
  scontrol = bin_dir / "scontrol"
  scontrol.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{tmp_path}/scontrol"\n')
  for tool in (srun, scontrol):
    tool.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
          "SLURM_GPUS_ON_NODE": "1", "RRCM_LOG_DIR": str(tmp_path / "logs")}


def test_slurm_requeues_a_preempted_job_and_reports_failures(tmp_path):
  env = _fake_slurm(tmp_path)
  result = run([SLURM, "bash", "-c", "exit 75"], env=env, cwd=tmp_path)
  assert result.returncode == 75
  assert (tmp_path / "scontrol").read_text().split() == ["requeue", "42"]
  assert "requeueing job 42 to resume" in result.stderr
  (tmp_path / "scontrol").unlink()
  result = run([SLURM, "bash", "-c", "exit 2"], env=env, cwd=tmp_path)
  assert result.returncode == 2 and not (tmp_path / "scontrol").exists()
  assert "bad input (exit 2)" in result.stderr


# ---------------------------------------------------------------- run.sh

FAKE_PYTHON = r"""#!/usr/bin/env bash
# The demo's stages: pre-training is preempted once, fine-tuning stops on bad input.
echo "$*" >> "$FAKE_DIR/calls"
case $2 in
  rrcm_jax.pretrain) [[ -f $FAKE_DIR/pretrained ]] || { touch "$FAKE_DIR/pretrained"; exit 75; } ;;
  rrcm_jax.finetune) exit 2 ;;
esac
exit 0
"""


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="run.sh's set-up would install Fashion-MNIST")
def test_run_sh_reruns_a_preempted_stage_and_stops_on_a_failed_one(tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  python = venv / "bin" / "python"
  python.write_text(FAKE_PYTHON)
  python.chmod(0o755)
  env = {"RRCM_VENV": str(venv), "FAKE_DIR": str(tmp_path), "RRCM_WORKDIR": str(tmp_path / "w")}
  result = run([os.path.join(REPO, "run.sh")], env=env)
  assert result.returncode == 2, result.stderr
  stages = [line.split()[1] for line in (tmp_path / "calls").read_text().splitlines()
            if line.startswith("-m ")]
  assert stages == ["rrcm_jax.data.prepare", "rrcm_jax.pretrain", "rrcm_jax.pretrain",
                    "rrcm_jax.finetune"]   # certification never starts
  assert ("pre-training was preempted (exit 75, checkpoint written); running it again"
          in result.stderr)
  assert "fine-tuning stopped with exit status 2" in result.stderr


# ---------------------------------------------------------------- gpu_local.sh

def test_gpu_dry_run():
  result = run([GPU, "--gpus", "0,1,2,3", "--mem-fraction", "0.8", "--dry-run", "--", *USER_CMD])
  assert result.returncode == 0, result.stderr
  assert commands(result.stdout) == [[
      "env", "-u", "RRCM_DISTRIBUTED", "-u", "RRCM_COORDINATOR", "-u", "RRCM_NUM_PROCESSES",
      "-u", "RRCM_PROCESS_ID", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8",
      "CUDA_VISIBLE_DEVICES=0,1,2,3", *USER_CMD]]


def test_gpu_runs_command_as_one_process():
  probe = ("import os; print(os.environ.get('RRCM_DISTRIBUTED'), "
           "os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])")
  env = dict(os.environ, RRCM_DISTRIBUTED="1", RRCM_PROCESS_ID="3")
  env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
  result = subprocess.run(["bash", GPU, "--", "python3", "-c", probe], capture_output=True,
                          text=True, env=env, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["None", "0.90"]


@pytest.mark.parametrize("args,names", [
    (["--mem-fraction", "1.5", "--", "x"], "--mem-fraction"),
    (["--mem-fraction", "0", "--", "x"], "--mem-fraction"),
    (["--gpus", "0;1", "--", "x"], "--gpus"),
    (["--oops", "--", "x"], "--oops"),
    ([], "command"),
])
def test_gpu_bad_arguments(args, names):
  result = run([GPU, *args, "--dry-run"])
  assert result.returncode == 2
  message = result.stderr.strip()
  assert message.startswith("gpu_local.sh: ") and "\n" not in message and names in message


# ---------------------------------------------------------------- slurm.sbatch

def test_slurm_sbatch_defaults():
  text = open(SLURM).read()
  directives = re.findall(r"^#SBATCH (\S+)$", text, flags=re.M)
  assert "--ntasks-per-node=1" in directives and "--requeue" in directives
  assert any(d.startswith("--signal=TERM@") for d in directives)
  assert any(d.startswith("--gpus-per-node=") for d in directives)
  # sbatch reads #SBATCH lines only before the first command.
  first_command = min(i for i, line in enumerate(text.splitlines())
                      if line.strip() and not line.startswith("#"))
  last_directive = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
  assert last_directive < first_command


def test_slurm_runs_command_on_each_node_with_distributed_env(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  srun = bin_dir / "srun"   # drops its options and runs the rest, as one task would
  srun.write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do echo "$1" >> "$SRUN_LOG"; '
                  'shift; done\nexec "$@"\n')
  srun.chmod(0o755)
  probe = ("import os, sys; print(os.environ['RRCM_DISTRIBUTED'], "
           "os.environ['JAX_LOCAL_DEVICE_IDS'], sys.argv[1:])")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_LOG": str(tmp_path / "srun"),
         "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "8", "RRCM_LOG_DIR": str(tmp_path / "logs")}
  result = run([SLURM, "python3", "-c", probe, "a b"], env=env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "1 0,1,2,3,4,5,6,7 ['a b']"
  srun_flags = (tmp_path / "srun").read_text().split()
  assert "--ntasks-per-node=1" in srun_flags and "--kill-on-bad-exit=1" in srun_flags
  assert f"--output={tmp_path}/logs/rrcm-42-proc%t.out" in srun_flags


def test_slurm_refuses_without_command_or_job():
  result = run([SLURM], env={"SLURM_JOB_ID": "1"})
  assert result.returncode == 2 and "no command given" in result.stderr
  env = dict(os.environ)
  env.pop("SLURM_JOB_ID", None)
  result = subprocess.run(["bash", SLURM, "true"], capture_output=True, text=True, env=env)
  assert result.returncode == 2 and "sbatch" in result.stderr


# ---------------------------------------------------------------- paper.sh

def paper_rows():
  result = run([PAPER, "list"])
  assert result.returncode == 0, result.stderr
  return [line.split()[0] for line in result.stdout.splitlines()]


def paper_command(row, root=None):
  result = run([PAPER, "print", row], env={"RRCM_ROOT": root} if root else None)
  assert result.returncode == 0, result.stderr
  (command,) = commands(result.stdout)
  return command


def test_paper_rows_cover_every_result():
  rows = paper_rows()
  assert len(rows) == len(set(rows))
  stages = [row.split("-")[0] for row in rows]
  assert [stages.count(s) for s in ("pretrain", "finetune", "certify", "dds")] == [3, 6, 6, 6]
  configs = {flag(paper_command(row), "--config") for row in rows}
  assert configs == PRETRAIN_CONFIGS | FINETUNE_CONFIGS | CERTIFY_CONFIGS | DDS_CONFIGS


def test_paper_commands_chain_workdirs():
  root = "gs://bucket/rrcm"
  for row in paper_rows():
    command = paper_command(row, root=root + "/")
    stage = row.split("-")[0]
    assert flag(command, "--workdir") == f"{root}/{row}"
    if stage == "dds":   # the public models of diffusion denoised smoothing, from RRCM_PUBLIC
      dataset, sigma = row.split("-")[1:]
      assert command[:3] == ["python", "-m", "rrcm_jax.certify"]
      assert flag(command, "--config") == f"configs/{dataset}_dds_certify.py:sigma={sigma}"
      denoiser, classifier = DDS_FILES[dataset]
      assert flag(command, "--config.dds.denoiser") == f"{root}/public/{denoiser}"
      assert flag(command, "--config.dds.classifier_checkpoint") == f"{root}/public/{classifier}"
      assert not any(w.startswith("--config.init_from=") for w in command)
      continue
    assert command[:3] == ["python", "-m", f"rrcm_jax.{stage}"]
    if stage == "pretrain":
      assert not any(w.startswith("--config.init_from=") for w in command)
      continue
    dataset, sigma = row.split("-")[1:]
    assert flag(command, "--config") == f"configs/{dataset}_{stage}.py:sigma={sigma}"
    source = (f"finetune-{dataset}-{sigma}" if stage == "certify"
              else f"pretrain-{dataset}-rcmb")
    assert flag(command, "--config.init_from") == f"{root}/{source}"
  assert flag(paper_command("pretrain-cifar10-rcmb"), "--workdir") == "./workdirs/pretrain-cifar10-rcmb"


def test_paper_run_dry_run_per_launcher():
  extra = ["--", "--config.data.data_dir=gs://b/tfds"]
  expected = paper_command("finetune-imagenet-0.5") + extra[1:]
  gpu = run([PAPER, "run", "finetune-imagenet-0.5", "--dry-run", "--gpus", "0,1", *extra])
  assert gpu.returncode == 0, gpu.stderr
  (gpu_cmd,) = commands(gpu.stdout)
  assert gpu_cmd[0] == "env" and gpu_cmd[-len(expected):] == expected
  slurm = run([PAPER, "run", "finetune-imagenet-0.5", "--launcher", "slurm", "--nodes=2",
               "--dry-run", *extra])
  assert commands(slurm.stdout) == [["sbatch", "--nodes=2", "launch/slurm.sbatch", *expected]]
  tpu = run([PAPER, "run", "pretrain-imagenet-rcmb", "--launcher", "tpu", *BASE, "--dry-run"],
            env={"RRCM_ROOT": "gs://b/r"})
  assert tpu.returncode == 0, tpu.stderr
  launch = commands(tpu.stdout)[-1]
  assert user_command(flag(launch, "--command")) == paper_command("pretrain-imagenet-rcmb", "gs://b/r")


@pytest.mark.parametrize("args,env,names", [
    (["run", "pretrain-imagenet-rcmb", "--launcher", "tpu", *BASE], {"RRCM_ROOT": "./workdirs"},
     "RRCM_ROOT"),
    (["run", "pretrain-imagenet-rcmb", "--launcher", "k8s"], None, "--launcher"),
    (["print", "no-such-row"], None, "no-such-row"),
    (["print", "pretrain-cifar10-rcmb", "stray"], None, "stray"),
    (["frobnicate"], None, "frobnicate"),
    ([], None, "subcommand"),
])
def test_paper_bad_arguments(args, env, names):
  result = run([PAPER, *args], env=env)
  assert result.returncode == 2
  message = result.stderr.strip()
  assert message.startswith("paper.sh: ") and "\n" not in message and names in message


def test_paper_config_files_exist():
  """Passes once every experiment config named by paper.sh is in configs/."""
  missing = sorted({flag(paper_command(row), "--config").split(":")[0] for row in paper_rows()}
                   - {p for p in (f"configs/{n}" for n in os.listdir(os.path.join(REPO, "configs")))})
  assert not missing, f"paper.sh names configs that do not exist yet: {missing}"


def test_paper_configs_accept_their_arguments():
  """Every --config=FILE:ARG of paper.sh builds (big_vision's key=value grammar)."""
  for row in paper_rows():
    path, _, arg = flag(paper_command(row), "--config").partition(":")
    module = importlib.import_module(path[:-len(".py")].replace("/", "."))
    config = module.get_config(arg or None)
    if arg:
      assert config.sigma == float(arg.removeprefix("sigma="))
