"""The serving image runs as a non-root user (read from the Dockerfile; no Docker needed)."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def final_stage_user(text: str) -> str | None:
    """The USER in force at the end of the Dockerfile's last stage (None: root by default).

    A stage built FROM an earlier stage starts with that stage's USER; FROM an image, with root.
    """
    user = None
    stage_users: dict[str, str | None] = {}
    stage = ""
    for line in text.replace("\\\n", " ").splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            stage_users[stage] = user
            user = stage_users.get(words[1]) if len(words) > 1 else None
            stage = words[3] if len(words) > 3 and words[2].upper() == "AS" else ""
        elif words[0].upper() == "USER" and len(words) > 1:
            user = words[1]
    return user


def is_root(user: str | None) -> bool:
    return user is None or user.split(":")[0] in ("root", "0")


def test_the_reader_tells_root_from_non_root() -> None:
    assert is_root(final_stage_user("FROM python\nRUN true\n"))
    assert is_root(final_stage_user("FROM a\nUSER app\nFROM b\nCMD x\n"))
    assert is_root(final_stage_user("FROM a\nUSER 0:0\n"))
    assert not is_root(final_stage_user("FROM a\nUSER root\nUSER 10001:10001\n"))
    assert not is_root(final_stage_user("FROM a AS base\nUSER app\nFROM base\nCMD x\n"))
    assert is_root(final_stage_user("FROM a AS base\nUSER app\nFROM a\nCMD x\n"))


def test_the_container_runs_as_a_non_root_user() -> None:
    assert DOCKERFILE.is_file(), f"no Dockerfile at {DOCKERFILE}: the serving image is undefined"
    user = final_stage_user(DOCKERFILE.read_text())
    assert not is_root(user), f"the final stage runs as {user or 'root (no USER)'}"
