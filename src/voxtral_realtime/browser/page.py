"""The in-browser page: copying it (and the onnxruntime-web files it loads) into an export folder, and serving
that folder from ``voxtral serve``.  The page's own files are in ``page/``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import VoxtralError, first_line
from .export import read_manifest

ONNXRUNTIME_WEB_VERSION = "1.30.0"


def mount_local(app: Any, folder: str | os.PathLike[str], path: str = "/local") -> None:
    """Serve an export folder with its page (``--onnxruntime-web``) at ``path`` of a Starlette/FastAPI ``app``,
    ahead of any catch-all mount.  The responses are cross-origin isolated (COOP/COEP), which lets
    onnxruntime-web use WebAssembly threads; the page fetches only same-origin files, so nothing breaks."""
    from starlette.responses import RedirectResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    folder = Path(folder)
    read_manifest(folder, verify=False)
    if not (folder / "index.html").is_file() or not (folder / "ort").is_dir():
        raise VoxtralError(f"{folder}: no page in it; export with --onnxruntime-web to add it")
    static = StaticFiles(directory=folder, html=True)
    isolation = [(b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-embedder-policy", b"require-corp")]

    async def isolated(scope: Any, receive: Any, send: Any) -> None:
        async def send_isolated(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *isolation]}
            await send(message)

        await static(scope, receive, send_isolated)

    async def add_slash(request: Any) -> Any:
        return RedirectResponse(path + "/")

    # routes match in order: in front of the server's own page, which is mounted at "/"
    app.router.routes[0:0] = [Route(path, add_slash), Mount(path, app=isolated, name="local")]


# -- the page's runtime files ------------------------------------------------------------------------------------


def copy_page(out: Path, onnxruntime_web: str | os.PathLike[str] | None) -> list[str]:
    """Copy the page (HTML + JS modules shipped in this package) into ``out`` and, from ``onnxruntime_web``
    (an ``npm pack`` tarball, a ``node_modules/onnxruntime-web`` folder, or "npm": the pinned version fetched with
    npm pack), the onnxruntime-web files it loads; return the copied names."""
    here = Path(__file__).parent
    # the transcript-file writers and the microphone capture (with its resampler) are the server page's modules:
    # one implementation of each
    files = [f for f in sorted((here / "page").iterdir()) if f.is_file()]
    server_page = here.parent / "server" / "web"
    files += [server_page / name for name in ("subtitles.js", "pcm-capture.worklet.js", "resampler.js")]
    copied = []
    for f in files:
        shutil.copyfile(f, out / f.name)
        copied.append(f.name)
    if onnxruntime_web == "npm":
        onnxruntime_web = npm_pack_onnxruntime_web()
    if onnxruntime_web is not None:
        copied += _copy_onnxruntime_web(Path(onnxruntime_web), out / "ort")
    return copied


#: The onnxruntime-web files the page imports: the ES module bundle with WebGPU, and its WebAssembly binaries.
ORT_WEB_FILES = ("ort.webgpu.bundle.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm",
                 "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")


def npm_pack_onnxruntime_web(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The pinned onnxruntime-web npm tarball, fetched once with ``npm pack`` into ``cache_dir`` (default:
    ~/.cache/voxtral-realtime)."""
    import subprocess

    folder = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "voxtral-realtime"
    tarball = folder / f"onnxruntime-web-{ONNXRUNTIME_WEB_VERSION}.tgz"
    if tarball.is_file():
        return tarball
    if shutil.which("npm") is None:
        raise VoxtralError("fetching onnxruntime-web needs npm (Debian/Ubuntu: apt install npm), or pass a tarball "
                           "made elsewhere with `npm pack onnxruntime-web@" + ONNXRUNTIME_WEB_VERSION + "`")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["npm", "pack", f"onnxruntime-web@{ONNXRUNTIME_WEB_VERSION}", "--pack-destination",
                        str(folder)], check=True, capture_output=True, text=True, timeout=180)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise VoxtralError(f"npm pack onnxruntime-web@{ONNXRUNTIME_WEB_VERSION} failed "
                           f"({first_line(detail.strip() or str(exc))})") from None
    if not tarball.is_file():
        raise VoxtralError(f"npm pack did not write {tarball}")
    return tarball


def _copy_onnxruntime_web(source: Path, dest: Path) -> list[str]:
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    if source.is_file():
        try:
            with tarfile.open(source) as tar:
                members = {m.name.removeprefix("package/dist/"): m for m in tar.getmembers()
                           if m.name.startswith("package/dist/")}
                version = json.load(tar.extractfile("package/package.json"))["version"]
                for name in ORT_WEB_FILES:
                    if name in members:
                        (dest / name).write_bytes(tar.extractfile(members[name]).read())
                        copied.append(f"ort/{name}")
        except (tarfile.TarError, KeyError, OSError, ValueError) as exc:
            raise VoxtralError(f"{source}: not an onnxruntime-web npm tarball ({first_line(exc)})") from None
    elif (source / "dist").is_dir():
        version = json.loads((source / "package.json").read_text())["version"]
        for name in ORT_WEB_FILES:
            if (source / "dist" / name).is_file():
                shutil.copyfile(source / "dist" / name, dest / name)
                copied.append(f"ort/{name}")
    else:
        raise VoxtralError(f"{source}: give an onnxruntime-web npm tarball (npm pack onnxruntime-web@"
                           f"{ONNXRUNTIME_WEB_VERSION}) or its node_modules/onnxruntime-web folder")
    if "ort/ort.webgpu.bundle.min.mjs" not in copied:
        raise VoxtralError(f"{source}: no dist/ort.webgpu.bundle.min.mjs in it (onnxruntime-web too old?)")
    (dest / "VERSION").write_text(version + "\n")
    return copied
