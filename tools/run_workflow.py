#!/usr/bin/env python3
"""Run one API-format ComfyUI workflow headless and save its outputs (standard library only).

Against a running ComfyUI (default http://127.0.0.1:8188):
    python tools/run_workflow.py workflows/api/t2i.json --out out/t2i

Or let the script start ComfyUI for the run (this pack must be in its custom_nodes/, the model in
models/lance/<name>/) and stop it afterwards:
    python tools/run_workflow.py workflows/api/t2v.json --comfyui ~/ComfyUI --python ~/ComfyUI/venv/bin/python

Change inputs without editing the file (NODE is a node id or a class_type; VALUE is JSON or a plain string):
    python tools/run_workflow.py workflows/api/t2i.json --set LanceT2I.prompt="a lighthouse at night" \
        --set LanceT2I.steps=20 --set LanceLoader.model_name=Lance-3B

Exit status: 0 success, 1 execution error / interrupted / timeout, 2 the server rejected the prompt (bad input).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


def api_request(server: str, path: str, data: dict | None = None, timeout: float = 30):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(server.rstrip("/") + path, data=body,
                                 headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw[:1] in (b"{", b"[") else raw


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_sets(workflow: dict, sets: list[str]) -> dict:
    for item in sets:
        target, sep, value = item.partition("=")
        node_key, dot, name = target.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected NODE.INPUT=VALUE")
        nodes = [k for k, n in workflow.items() if k == node_key or n.get("class_type") == node_key]
        if not nodes:
            raise SystemExit(f"--set {item!r}: no node with id or class_type {node_key!r}")
        for key in nodes:
            workflow[key]["inputs"][name] = _parse_value(value)
    return workflow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(comfyui: str, python: str, extra: list[str], startup_timeout: float):
    port = _free_port()
    cmd = [python, "-u", os.path.join(comfyui, "main.py"), "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", *extra]
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"comfyui-run-{port}.log"), "w")
    print(f"[run] starting {' '.join(cmd)} (log {log.name})")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=comfyui)
    server = f"http://127.0.0.1:{port}"
    deadline = time.time() + startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ComfyUI exited during startup (status {proc.returncode}); see {log.name}")
        try:
            api_request(server, "/system_stats", timeout=2)
            return proc, server
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"ComfyUI did not start within {startup_timeout} s; see {log.name}")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def run(server: str, workflow: dict, out_dir: Path, timeout: float) -> int:
    client_id = uuid.uuid4().hex
    try:
        queued = api_request(server, "/prompt", {"prompt": workflow, "client_id": client_id})
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"[run] the server rejected the workflow (HTTP {exc.code}):")
        try:
            data = json.loads(detail)
            print(f"  {data.get('error', {}).get('message', '')}: {data.get('error', {}).get('details', '')}")
            for node_id, info in (data.get("node_errors") or {}).items():
                for err in info.get("errors", []):
                    print(f"  node #{node_id} {info.get('class_type')}: {err.get('message')}: {err.get('details')}")
        except json.JSONDecodeError:
            print(detail)
        return 2
    prompt_id = queued["prompt_id"]
    print(f"[run] queued prompt {prompt_id}")
    deadline, entry = time.time() + timeout, None
    while time.time() < deadline:
        history = api_request(server, f"/history/{prompt_id}")
        entry = history.get(prompt_id) if isinstance(history, dict) else None
        if entry and entry.get("status", {}).get("completed") is not None and \
                (entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
            break
        time.sleep(0.5)
    else:
        print(f"[run] timeout after {timeout} s: interrupting")
        try:
            api_request(server, "/interrupt", {})
        except Exception:  # noqa: BLE001
            pass
        return 1
    status = entry.get("status", {})
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            print(f"[run] error in node #{data.get('node_id')} {data.get('node_type')}: "
                  f"{data.get('exception_type')}: {data.get('exception_message')}")
        elif kind == "execution_interrupted":
            print(f"[run] interrupted at node #{data.get('node_id')} {data.get('node_type')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = 0
    for node_id, outputs in (entry.get("outputs") or {}).items():
        for key, items in outputs.items():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                                    "type": item.get("type", "output")})
                    target = out_dir / item["filename"]
                    target.write_bytes(api_request(server, f"/view?{query}", timeout=300))
                    print(f"[run] saved {target}")
                    saved += 1
                elif key == "text" and isinstance(item, str):
                    target = out_dir / f"node{node_id}_text.txt"
                    with open(target, "a") as handle:
                        handle.write(item + "\n")
                    print(f"[run] node #{node_id} text: {item}")
                    saved += 1
    ok = status.get("status_str") == "success" and status.get("completed")
    print(f"[run] {'success' if ok else 'failed'}; {saved} output(s) in {out_dir}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/t2i.json)")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="running ComfyUI (default %(default)s)")
    parser.add_argument("--comfyui", help="start this ComfyUI folder (main.py) for the run instead of --server")
    parser.add_argument("--python", default=sys.executable, help="interpreter for --comfyui (default: this one)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra main.py argument for --comfyui, e.g. --server-arg=--cpu (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input (NODE: node id or class_type; repeatable)")
    parser.add_argument("--out", default="out", help="folder for the outputs (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the workflow (default %(default)s)")
    parser.add_argument("--startup-timeout", type=float, default=300)
    args = parser.parse_args(argv)

    workflow = json.loads(Path(args.workflow).read_text())
    if "nodes" in workflow and "links" in workflow:
        raise SystemExit(f"{args.workflow} is a UI-format workflow; use the API-format file (workflows/api/) or "
                         f"export it with 'Export (API)' in ComfyUI")
    workflow = apply_sets(workflow, args.set)
    proc, server = None, args.server
    if args.comfyui:
        proc, server = start_server(args.comfyui, args.python, args.server_arg, args.startup_timeout)
    try:
        return run(server, workflow, Path(args.out), args.timeout)
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
