"""Continuing a study by its name: what it measures comes from the study, not from the flags.

`hpsearch run --study s --trials 50` on a study made with `--epochs 5 --subset 10000` continues
it as it was made. A setting the user gives and that differs from the study's is refused, all of
them in one line, in flag syntax (`--subset 10000`), because a study must measure one thing.
"""

from __future__ import annotations

import dataclasses
import json

from ..config import RunSettings
from ..errors import HPSearchError
from ..space import Space, load_space, space_from_dict
from .schema import IDENTITY, StudyAttr, settled_study_attrs, study_attrs
from .storage import open_storage, storage_file


def continue_settings(settings: RunSettings) -> tuple[RunSettings, Space]:
    """`settings` with every identity setting the user did not give taken from the study (when
    it exists), and the space to search; refuses given settings that differ."""
    stored = None if settings.given is None else _stored_identity(settings)
    if stored is None:
        return settings, load_space(settings.space)
    given = set(settings.given)
    adopted, differences = {}, []
    for key in IDENTITY:
        if key == StudyAttr.SPACE:
            continue
        if key not in given:
            adopted[key] = stored.get(key)
        elif getattr(settings, key) != stored.get(key):
            differences.append(_as_flag(key, stored.get(key)))
    if "space" in given:
        space = load_space(settings.space)
        if space.to_dict() != stored.get(StudyAttr.SPACE):
            differences.append(f"the search space stored in the study (not {space.source})")
    else:
        space = space_from_dict(stored.get(StudyAttr.SPACE), f"study {settings.study!r}")
    if differences:
        raise HPSearchError(f"study {settings.study!r} was created with {', '.join(differences)}; leave those flags "
                            f"out to continue it, or pick a new --study")
    return dataclasses.replace(settings, **adopted), space


def _as_flag(key: str, value) -> str:
    flag = "--" + key.replace("_", "-")
    if value is None:
        return f"no {flag}"
    return f"{flag} {value if isinstance(value, (int, float, str)) else json.dumps(value)}"


def _stored_identity(settings: RunSettings) -> dict | None:
    """The study's attributes if it exists and its creator recorded what it measures, else None.
    Creates nothing."""
    file = storage_file(settings.storage)
    if file is not None and not file.is_file():
        return None
    storage = open_storage(settings.storage)
    try:
        study_id = storage.get_study_id_from_name(settings.study)
    except KeyError:
        return None
    if StudyAttr.DATASET not in study_attrs(storage, study_id):
        return None  # nobody claimed it (yet, or made with Optuna's API): open_study decides, under the lock
    # Claimed, but no lock is held here: the creator may still be writing; wait for the rest.
    return settled_study_attrs(storage, study_id, wait=True)
