"""Every shell command of README.md runs, verbatim, in a clean copy of the repository.

The commands of the README's ```bash blocks are run in order by bash, in a temporary copy of
the repository's files (so `data/`, `runs/` and `reports/` are written there), with the
package's console script on PATH and `MULTIMODAL_MAX_STEPS=2` (multimodal/short_runs.py): every
training and evaluation stops after 2 steps / batches, so the README cannot rot without this
test failing. Commands that cannot run here are skipped by `SKIPS`, each with its reason; a
command that repeats one already run is run once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from multimodal.short_runs import ENV

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STEPS = "2"
TIMEOUT_S = 600  # one command (the DDP fit starts two processes)
# a user's shell has none of these; one left in the test process by an earlier in-process
# distributed test would point a README DDP run at another run's rendezvous
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")

# (regular expression searched in the command, why it is not run here)
SKIPS: tuple[tuple[str, str], ...] = (
    (
        r"^make\b",
        "make targets install .venv and run for minutes; `make test` would run this "
        "test again; `multimodal demo` (make demo) is tests/test_demo_command.py",
    ),
    (r"--pretrained laion2b", "downloads open_clip weights from the hub (no network in tests)"),
    (r"--data imagenet/", "ImageNet is not on disk"),
    (r"--root ~/datasets", "the torchvision dataset must be downloaded first (no network)"),
    (r"--images photos/", "the user's own image folder and captions file"),
    (r"predict_images photos/", "the user's own image folder"),
    (
        r"^sbatch\b",
        "needs a SLURM cluster (test_cluster.py runs it under a stand-in srun)",
    ),
    (r"^configs/cluster/torchrun\.sh\b", "one process per GPU of a GPU machine"),
    (
        r"--checkpoint runs/demo/",
        "needs `make demo`'s full run (skipped above); tests/test_demo_figures.py runs this "
        "zeroshot command, probes and group pattern included, on the demo's checkpoint",
    ),
)


@dataclass(frozen=True)
class Command:
    """One README command: its text as written (continuation lines kept) and its line."""

    text: str
    line: int

    @property
    def one_line(self) -> str:
        """The command on one line: continuations joined, the trailing comment dropped."""
        joined = re.sub(r"\\\n\s*", "", self.text)
        return re.sub(r"\s+#.*$", "", joined).strip()


def bash_commands(markdown: str) -> list[Command]:
    """The commands of every ```bash block of `markdown`, in order: comment and blank lines
    dropped, a line ending in a backslash joined with the next."""
    commands: list[Command] = []
    in_block = False
    pending: list[str] = []
    start = 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        fence = line.strip()
        if not in_block:
            in_block = fence == "```bash"
            continue
        if fence == "```" and not pending:
            in_block = False
            continue
        if not pending and (not fence or fence.startswith("#")):
            continue
        if not pending:
            start = number
        pending.append(line)
        if not line.rstrip().endswith("\\"):
            commands.append(Command("\n".join(pending), start))
            pending = []
    if pending or in_block:
        raise ValueError(f"README ends inside a ```bash block or a continued command: {pending}")
    return commands


def skip_reason(command: Command, seen: set[str]) -> str | None:
    """Why `command` is not run (None: it runs)."""
    for pattern, reason in SKIPS:
        if re.search(pattern, command.one_line):
            return reason
    if command.one_line in seen:
        return "repeats a command already run above"
    return None


def repo_copy(destination: Path) -> Path:
    """The repository's files (tracked and untracked, not ignored) copied to `destination`: a
    clean checkout without data/, runs/, reports/ or .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def test_bash_commands_are_read_with_continuations_and_without_comments():
    markdown = "\n".join(
        [
            "text",
            "```bash",
            "# a comment line",
            "make demo    # trailing comment",
            "",
            "multimodal fit --config a.yaml \\",
            "    --trainer.max_epochs 1",
            "```",
            "```python",
            "print('not bash')",
            "```",
            "```bash",
            "multimodal --help",
            "```",
        ]
    )
    commands = bash_commands(markdown)
    assert [c.line for c in commands] == [4, 6, 13]
    assert [c.one_line for c in commands] == [
        "make demo",
        "multimodal fit --config a.yaml --trainer.max_epochs 1",
        "multimodal --help",
    ]
    assert commands[1].text == "multimodal fit --config a.yaml \\\n    --trainer.max_epochs 1"
    with pytest.raises(ValueError, match="ends inside"):
        bash_commands("```bash\nmultimodal fit \\\n")


def test_every_skip_names_a_readme_command():
    """A skip that matches no command is stale: the README changed, the list must follow."""
    commands = bash_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 10, "the README's ```bash blocks were not found"
    stale = [p for p, _ in SKIPS if not any(re.search(p, c.one_line) for c in commands)]
    assert not stale, f"skips that match no README command: {stale}"


def run_command(text: str, cwd: Path, env: dict[str, str]) -> tuple[int | str, str]:
    """(exit status, stdout + stderr) of one command run by bash in its own process group.
    A command still running after TIMEOUT_S is killed with every process it started (the
    ranks of a DDP run too, which would otherwise be left behind) and reported with what it
    printed, and the remaining commands still run."""
    process = subprocess.Popen(
        ["bash", "-c", text], cwd=cwd, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        return process.returncode, stdout + stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return f"timeout after {TIMEOUT_S} s", stdout + stderr


@pytest.mark.slow
def test_every_readme_command_runs_verbatim(tmp_path):
    workdir = repo_copy(tmp_path / "repo")
    env = {
        **{k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        ENV: STEPS,
        "HOME": str(tmp_path / "home"),  # nothing read from or written to the user's home
    }
    seen: set[str] = set()
    failures, report = [], []
    total = time.perf_counter()
    for command in bash_commands(README.read_text(encoding="utf-8")):
        reason = skip_reason(command, seen)
        if reason is not None:
            report.append(f"skipped  README:{command.line} {command.one_line}  ({reason})")
            continue
        seen.add(command.one_line)
        start = time.perf_counter()
        returncode, output = run_command(command.text, workdir, env)
        elapsed = time.perf_counter() - start
        report.append(f"rc={returncode} {elapsed:5.1f} s README:{command.line} "
                      f"{command.one_line}")  # fmt: skip
        if returncode != 0:
            tail = output.strip().splitlines()[-15:]
            failures.append(f"README:{command.line} {command.one_line}\n  " + "\n  ".join(tail))
    print("\n".join(report), f"\ntotal {time.perf_counter() - total:.0f} s")
    assert not failures, "README commands failed:\n\n" + "\n\n".join(failures)
