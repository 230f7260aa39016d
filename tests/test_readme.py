"""The README cannot drift from the code: every command of it runs here, on the demo data.

The README's commands use the real default paths (`data/train.csv`, `LRMovieNet/...`, `log/<procedure>/<exp>/`).
The `world` fixture builds a folder where those paths exist, filled with the demo datasets (`datasets/demo.py`, in
the real formats) and with small checkpoints trained here, and every command runs inside it through `main()`:
- a training procedure runs as `--dry_run` (it reads the data's annotations and builds the paper-size model);
- everything else (eval, predict, data_summary, `--mode eval`) runs for real;
- `torchrun ... main.py ARGS` runs as one process (`python main.py ARGS`, a dry run);
- `make X` and `./download_data.sh [--flag]` are checked to exist (they download or install).
A block after an HTML comment `<!-- pending: REASON -->` is skipped with that reason (a feature not merged yet).
Running them takes about 2 minutes (marked slow); the fast suite parses every command's flags and values.

Also: the first screen fits in 60 lines and names the papers, the two commands and what `make demo` prints; every
relative link of README.md and docs/ resolves; nothing in the repository sends a reader outside it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from contextlib import chdir
from pathlib import Path

import numpy as np
import pytest

from datasets.demo import ensure_demo_dataset, ensure_letor_demo, ensure_ranking_demo
from epoch_loops.demo import DEMO_AGENT, DEMO_PROPOSALS
from epoch_loops.procedures import PROCEDURES
from epoch_loops.ranking.demo import MODEL
from main import build_parser, main
from tests.conftest import REPO, requires_java
from utilities.config import config_from_argv

README = REPO / "README.md"
FIRST_SCREEN_LINES = 60
TRAINING = {name for name, p in PROCEDURES.items() if p.trains}
# The demo's captions come from a grammar without punctuation or joining words ("and", "then"): the rule that
# labels sub-goal ends finds none, so the critic has nothing to learn there, and says so.
FAILS_ON_DEMO = {"train_critic": "./data/train.csv: no token is labelled as a segment end"}
# Pages other branches add; a link to them resolves once those are merged (then empty this set).
PENDING_PAGES: set[str] = set()


def readme_blocks(text: str) -> list[tuple[str, str | None]]:
    """The ```bash / ```sh blocks in order, each with the reason of a `<!-- pending: ... -->` right before it."""
    pattern = re.compile(
        r"(?:<!--\s*pending:\s*(?P<reason>.*?)\s*-->\s*\n)?```(?:bash|sh)\n(?P<body>.*?)```", re.S
    )
    return [(m["body"], m["reason"]) for m in pattern.finditer(text)]


def commands(block: str) -> list[str]:
    """One string per command: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = (line.split("#", 1)[0].strip() for line in joined.splitlines())
    return [line for line in lines if line]


def readme_commands() -> list[pytest.param]:
    params = []
    for body, reason in readme_blocks(README.read_text()):
        for command in commands(body):
            marks = [pytest.mark.skip(reason=f"pending: {reason}")] if reason else []
            params.append(pytest.param(command, marks=marks, id=command[:70]))
    return params


def flags(settings: dict) -> list[str]:
    """A settings dict (the demo's configurations) as command-line flags."""
    argv = []
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def link_tree(target: Path, sources: dict[str, Path]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).symlink_to(source)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder laid out as a user's checkout after the downloads, with the demo data in place of the real."""
    root = tmp_path_factory.mktemp("world")
    demo = ensure_demo_dataset(root / ".demo" / "captioning")
    letor = ensure_letor_demo(root / ".demo" / "letor")
    ranking = ensure_ranking_demo(root / ".demo" / "ranking")
    link_tree(
        root / "data",
        {p.name: p for p in demo.root.iterdir()}
        | {"MSLR-WEB10K": letor.source_dir, "MQ2008": letor.target_dir},
    )
    link_tree(
        root / "LRMovieNet",
        {p.name: p for p in ranking.root.iterdir()}
        | {"first_second_data_pair/first_second_data_pair_10pct.json": ranking.pairs},
    )
    # BMT's sample video: features of its real shapes (I3D rgb/flow 14 × 1024, VGGish 36 × 128)
    rng = np.random.default_rng(0)
    (root / "sample").mkdir()
    for name, shape in {"rgb": (14, 1024), "flow": (14, 1024), "vggish": (36, 128)}.items():
        np.save(root / "sample" / f"women_long_jump_{name}.npy", rng.random(shape, dtype=np.float32))
    # BMT's released val_1 captions: here the demo's val_1 references as a submission
    references = json.loads(demo.val_1_json.read_text())
    results = {
        vid: [
            {"sentence": s, "timestamp": t} for s, t in zip(ref["sentences"], ref["timestamps"], strict=True)
        ]
        for vid, ref in references.items()
    }
    (root / "captioning_results_val_1_e26.json").write_text(json.dumps({"results": results}))

    # the checkpoints the README's later commands read, trained briefly at the demo's small sizes
    with chdir(root):
        train_checkpoints(root, ranking)
    return root


def train_checkpoints(root: Path, ranking) -> None:
    log = str(root / "log")
    agent = [
        *flags(DEMO_AGENT),
        "--epoch_num",
        "1",
        "--rl_warmstart_epochs",
        "1",
        "--one_by_one_starts_at",
        "9",
    ]
    warm = root / "log" / "train_rl_cap" / "warm"
    assert main(["--procedure", "train_rl_cap", *agent, "--exp_name", "warm", "--log_dir", log]) == 0
    shutil.copytree(warm, root / "log" / "train_rl_cap" / "rl")
    proposals = {**DEMO_PROPOSALS, "epoch_num": 1}
    last = str(warm / "checkpoints" / "last")
    assert (
        main([*flags(proposals), "--exp_name", "prop", "--log_dir", log, "--rl_pretrained_model_dir", last])
        == 0
    )
    stage = ["--procedure", "pointwise", "--exp_name", "s1", "--log_dir", log, "--epochs_num", "1"]
    overrides = {**ranking.config_overrides("pointwise"), "text_feat_dim": ranking.visual_feat_dim}
    assert main([*stage, *flags(MODEL), *flags(overrides), "--max_tags", str(ranking.max_tags)]) == 0


def main_args(command: str) -> list[str] | None:
    """The arguments a README command gives main.py; None for `make X` and `./download_data.sh`, which are
    checked to exist here (they install or download)."""
    argv = shlex.split(command)
    if argv[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert all(a in targets or "=" in a for a in argv[1:]), command
        return None
    if argv[0] == "./download_data.sh":
        script = (REPO / "download_data.sh").read_text()
        assert all(flag in script for flag in argv[1:]), command
        return None
    if argv[0] == "torchrun":  # one process stands for all
        argv = ["python", *argv[argv.index("main.py") :]]
    assert argv[:2] == ["python", "main.py"], f"not a main.py command: {command}"
    return argv[2:]


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command):
    """Fast: every flag of every README command exists and holds a valid value (the slow test runs them)."""
    args = main_args(command)
    if args is not None and "--help" not in args:
        config_from_argv(build_parser(), args)


@requires_java
@pytest.mark.slow  # the demo data and three small trainings: about 2 minutes on 2 cores
@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_runs_on_the_demo_data(world, tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(world)
    args = main_args(command)
    if args is None:
        return
    if "--help" in args:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0
        return
    procedure = args[args.index("--procedure") + 1]
    mode = args[args.index("--mode") + 1] if "--mode" in args else None
    trains = procedure in TRAINING and mode != "eval"
    extra = ["--log_dir", str(tmp_path / "log"), "--num_workers", "0"] + (["--dry_run"] if trains else [])
    code = main([*args, *extra])
    err = capsys.readouterr().err
    if procedure in FAILS_ON_DEMO:  # it reads and checks the data, and stops with the one line it should
        assert code == 2 and FAILS_ON_DEMO[procedure] in err, err
        return
    assert code == 0, err


def first_screen() -> str:
    return "\n".join(README.read_text().splitlines()[:FIRST_SCREEN_LINES])


def test_the_first_screen_names_the_papers_the_commands_and_what_the_demo_prints():
    screen = first_screen()
    for needle in ("BMHRL", "LR²PPO", "Multimodal Label Relevance Ranking via Reinforcement Learning",
                   "arxiv.org/abs/2407.13221", "github.com/d-rothen/bmhrl", "make demo", "make test",
                   "mean METEOR"):  # fmt: skip
        assert needle in screen, needle
    # the demo's table sits in full on the first screen, one row per method the demo prints
    for method in ("most_frequent", "nearest_neighbour", "warm_start", "rl_biased_kl", "rl_scst"):
        assert re.search(rf"^\s*{method} \|", screen, re.M), method


def markdown_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def test_every_relative_link_of_the_documentation_resolves():
    for page in markdown_files():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path = (page.parent / target).resolve()
            if path.relative_to(REPO.resolve()).as_posix() in PENDING_PAGES:
                continue
            assert path.exists(), f"{page.relative_to(REPO)}: link to {target} does not resolve"


def test_nothing_in_the_repository_points_outside_it():
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    forbidden = re.compile(r"\.\./shared|DESIGN\.md|spec §|PERFORMANCE\.md")
    offenders = []
    for name in files:
        path = REPO / name
        if (
            name == "tests/test_readme.py"
            or not path.is_file()
            or path.suffix in {".npy", ".h5", ".pt", ".png"}
        ):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if forbidden.search(line):
                offenders.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


@requires_java
@pytest.mark.slow  # scores BMT's 4,483 val_1 videos: about a minute
def test_the_evaluation_example_prints_the_table_the_readme_shows(shared_data, tmp_path, monkeypatch, capsys):
    """The README's first evaluation command, on the real files it names, prints exactly the block after it."""
    text = README.read_text()
    section = text[text.index("## Evaluate predictions") :]
    command = commands(readme_blocks(section)[0][0])[0]
    shown = re.search(r"```\n(references: .*?)```", section, re.S)[1].strip().splitlines()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val_1_no_missings.json").symlink_to(
        shared_data / "activitynet" / "val_1_no_missings.json"
    )
    submission = shared_data / "bmt_predictions" / "captioning_results_val_1_e26.json"
    (tmp_path / "captioning_results_val_1_e26.json").symlink_to(submission)
    monkeypatch.chdir(tmp_path)
    assert main([*shlex.split(command)[2:], "--log_dir", "log"]) == 0
    printed = [line for line in capsys.readouterr().out.strip().splitlines() if line]
    assert printed[: len(shown)] == shown
