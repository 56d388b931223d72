"""The README's Node helper, run for real: node, grpc-js and proto-loader
against a running server.

The helper is taken from README.md as written (the one ```js block after the
"**Errors in Node (grpc-js).**" paragraph), saved as ``authsvc.js`` and
required by a small driver that makes calls and prints, for each, the status
code and the ErrorInfo the helper decoded from ``grpc-status-details-bin``.
The protos are the repository's own ``protos/`` (google/api and google/rpc
vendored there), loaded by proto-loader and protobufjs exactly as a Node
caller would load them: this also proves that grpc-js accepts the
``google.api.field_behavior`` imports and that proto-loader now loads
``authsvc.v1.ErrorReason`` with the services.

The npm packages come from ``tests/run``, which installs the versions
``tests/node/package-lock.json`` pins into ``.venv/node`` (once per change).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from authsvc_client.v1 import errors_pb2, orgs_pb2
from tests.app import API_KEY, Api, bearer, find_leaks, new_slug, remember
from tests.processes import run_async

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = Path(sys.prefix) / "node" / "node_modules"
ANCHOR = "**Errors in Node (grpc-js).**"
_FENCE = re.compile(r"^```js\n(.*?)^```$", re.MULTILINE | re.DOTALL)

# Calls the helper's clients and prints one JSON object per call: the call's
# name, the status code's name and the decoded ErrorInfo (or null).
DRIVER = r"""
const { grpc, authsvc, errorInfo } = require('./authsvc.js');

const target = process.env.AUTHSVC_TARGET;
const insecure = grpc.credentials.createInsecure();
const auth = new authsvc.AuthService(target, insecure);
const orgs = new authsvc.OrgService(target, insecure);
const cases = JSON.parse(process.env.CASES);

function metadata(headers) {
  const md = new grpc.Metadata();
  for (const [key, value] of Object.entries(headers || {})) md.set(key, value);
  return md;
}

function run([name, client, method, request, headers]) {
  const stub = { auth, orgs }[client];
  return new Promise((resolve) => {
    stub[method](request, metadata(headers), (error) => {
      resolve({
        name,
        code: error ? grpc.status[error.code] : 'OK',
        info: error ? errorInfo(error) : null,
      });
    });
  });
}

(async () => {
  const results = [];
  for (const c of cases) results.push(await run(c));
  // What proto-loader loaded along with the services: the ErrorReason enum.
  const reasons = authsvc.ErrorReason.type.value.map((v) => [v.name, v.number]);
  console.log(JSON.stringify({ results, reasons }));
  auth.close();
  orgs.close();
})();
"""


def helper_from_readme() -> str:
    """The one ```js block of the README's Node helper paragraph."""
    readme = (ROOT / "README.md").read_text()
    at = readme.find(ANCHOR)
    assert at >= 0, f"README.md has no {ANCHOR!r} paragraph"
    following = readme[at:]
    end = re.search(r"^#{1,6} |^\*\*[^*\n]+\.\*\*", following[len(ANCHOR) :], re.MULTILINE)
    section = following[: len(ANCHOR) + end.start()] if end else following
    blocks = _FENCE.findall(section)
    assert len(blocks) == 1, f"{len(blocks)} ```js blocks under {ANCHOR!r}, not one"
    return str(blocks[0])


def test_the_readme_has_the_helper() -> None:
    code = helper_from_readme()
    assert "grpc-status-details-bin" in code
    assert "google/rpc/status.proto" in code
    assert "module.exports" in code


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is not installed (./tests/run installs nodejs with apt-get)")
    for package in ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs"):
        if not (NODE_MODULES / package / "package.json").is_file():
            pytest.fail(f"{package} is not in {NODE_MODULES}: run ./tests/run (npm ci)")
    return found


async def run_node(node: str, tmp: Path, target: str, cases: list[Any]) -> dict[str, Any]:
    (tmp / "authsvc.js").write_text(helper_from_readme())
    (tmp / "driver.js").write_text(DRIVER)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "NODE_PATH": str(NODE_MODULES),
        "AUTHSVC_PROTOS": str(ROOT / "protos"),
        "AUTHSVC_TARGET": target,
        "CASES": json.dumps(cases),
    }
    code, out, err = await run_async(node, "driver.js", cwd=tmp, env=env)
    text = out + err
    assert code == 0, text
    assert not find_leaks(text), find_leaks(text)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def test_the_helper_decodes_reasons_from_a_running_server(
    api: Api, node: str, tmp_path: Path
) -> None:
    created = await api.sign_up()
    wrong = f"not the password {uuid.uuid4().hex}"
    remember(wrong)
    org = (
        await api.orgs.CreateOrg(
            orgs_pb2.CreateOrgRequest(slug=new_slug("node"), name="Node"),
            metadata=bearer(created.tokens.access_token),
        )
    ).org
    # The owner's session has no active org yet: acting in the org by its
    # slug is refused before any lookup.
    user = dict(bearer(created.tokens.access_token))
    cases = [
        [
            "wrong-password",
            "auth",
            "SignInWithPassword",
            {"email": created.user.email, "password": wrong},
            {},
        ],
        ["slug-not-active", "orgs", "GetOrg", {"org_slug": org.slug}, user],
        ["slug-unknown", "orgs", "GetOrg", {"org_slug": new_slug("none")}, {"x-api-key": API_KEY}],
        ["slug-known", "orgs", "GetOrg", {"org_slug": org.slug}, {"x-api-key": API_KEY}],
    ]
    out = await run_node(node, tmp_path, api.target, cases)
    got = {r["name"]: (r["code"], r["info"]) for r in out["results"]}
    assert got["slug-known"] == ("OK", None)
    expected = {
        "wrong-password": ("UNAUTHENTICATED", "INVALID_CREDENTIALS"),
        "slug-not-active": ("PERMISSION_DENIED", "ORG_MISMATCH"),
        "slug-unknown": ("NOT_FOUND", "ORG_NOT_FOUND"),
    }
    for name, (code, reason) in expected.items():
        got_code, info = got[name]
        assert (got_code, info and info["reason"]) == (code, reason), (name, got[name])
        assert info["domain"] == "authsvc"
        assert re.fullmatch(r"[0-9a-f]{32}", info["metadata"]["request_id"])
    # proto-loader loads ErrorReason with the services (every service file
    # imports errors.proto through options.proto), every value of it.
    assert dict(map(tuple, out["reasons"])) == dict(errors_pb2.ErrorReason.items())
