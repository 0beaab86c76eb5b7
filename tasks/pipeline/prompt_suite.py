"""The fixed prompt suites both models answer: versioned YAML files in tasks/prompt_suites/.

A suite is identified by its name and the sha256 of its file, both shown in the report, so two
reports compare like with like only when both match.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from tasks.pipeline.config import PROMPT_SUITE_DIR, ConfigError


def suite_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    return p if p.is_file() else PROMPT_SUITE_DIR / f"{name_or_path}.yaml"


def load_suite(name_or_path: str) -> dict:
    path = suite_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"config key 'prompt_suite': no suite file {path}")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"prompt suite {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list) or not data["prompts"]:
        raise ConfigError(f"prompt suite {path} must be a mapping with a non-empty 'prompts' list")
    seen = set()
    prompts = []
    for i, item in enumerate(data["prompts"], start=1):
        where = f"prompt suite {path} entry {i}"
        if not isinstance(item, dict) or set(item) - {"id", "category", "prompt"}:
            raise ConfigError(f"{where}: needs exactly the keys id, category, prompt")
        for key in ("id", "category", "prompt"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise ConfigError(f"{where}: '{key}' must be a non-empty string")
        if item["id"] in seen:
            raise ConfigError(f"{where}: duplicate id {item['id']!r}")
        seen.add(item["id"])
        prompts.append(dict(item))
    return {
        "name": str(data.get("name") or path.stem),
        "description": str(data.get("description", "")),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "path": str(path),
        "prompts": prompts,
    }
