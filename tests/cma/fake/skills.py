"""Skills and their versions: the worker-facing endpoints (E9 resolves a
version, ``latest`` included; E10 serves an archive by its concrete id or
number) and the skills the control API registers."""

from __future__ import annotations

import base64

from .util import ApiError, new_id, rfc3339


def skill_version_view(skill, ver):
    return {"type": "skill_version", "id": ver["id"], "skill_id": skill["skill_id"], "version": ver["version"],
            "name": ver["name"], "description": ver.get("description", ""), "directory": ver["name"],
            "created_at": ver["created_at"]}


def new_skill(body):
    """A skill from the control API's ``POST /_fake/skills`` body; the last
    version is ``latest``."""
    sk = {"skill_id": body.get("skill_id") or new_id("skill"), "type": body.get("type", "custom"),
          "versions": []}
    for i, v in enumerate(body.get("versions") or []):
        if not isinstance(v.get("archive_b64"), str):
            raise ApiError(400, "versions[].archive_b64 required")
        base64.b64decode(v["archive_b64"])
        sk["versions"].append({
            "id": v.get("id") or new_id("skillver"),
            "version": str(v.get("version") or (1700000000000000 + i)),
            "name": v.get("name", "skill"),
            "description": v.get("description", ""),
            "archive_b64": v["archive_b64"],
            "created_at": rfc3339(),
            "downloads": 0,
        })
    return sk


def skill_control(sk):
    """The control API's view of a skill (versions without their archives)."""
    return {"skill_id": sk["skill_id"], "type": sk["type"],
            "versions": [{k: v for k, v in ver.items() if k != "archive_b64"} for ver in sk["versions"]],
            "latest": sk["versions"][-1]["id"] if sk["versions"] else None}


def skill_api(state, ep, p):
    """E9 or E10 (the state locked); returns (status, answer)."""
    skill = state.skills.get(p["skill_id"])
    if skill is None:
        raise ApiError(404, f"skill {p['skill_id']} not found")
    v = p["version"]
    if v == "latest" and ep == "E9":
        ver = skill["versions"][-1] if skill["versions"] else None
    else:
        ver = next((x for x in skill["versions"] if v in (x["id"], x["version"])), None)
    if ver is None:
        raise ApiError(404, f"skill version {v} not found")
    if ep == "E9":
        return 200, skill_version_view(skill, ver)
    ver["downloads"] += 1
    return 200, base64.b64decode(ver["archive_b64"])
