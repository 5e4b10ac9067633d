#!/usr/bin/env python3
"""Write an OCI image archive from directories, deterministically, with no container engine.

    python3 hack/lib/oci.py --out FILE.tar --ref NAME:TAG [--layer DIR]...
        [--entrypoint JSON-ARRAY] [--cmd JSON-ARRAY] [--env K=V]... [--workdir DIR]
        [--label K=V]...

Each --layer DIR becomes one gzip layer, in order (the first is the bottom): entries sorted by
path, mtime 0, owner root, modes and symlinks kept, hard links stored as plain files. The same
inputs always give the same bytes, so the manifest digest identifies the content.

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) whose index names
the image for containerd (`io.containerd.image.name` = NAME:TAG, `org.opencontainers.image.ref.name`
= TAG), plus a Docker manifest.json over the same blobs, so one file serves
`ctr images import`, `docker load` and `podman load`. Prints the manifest digest and the
archive size on stderr.

It only reads the layer directories and writes --out; it never talks to a daemon or a registry.
Python 3 standard library only.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
# A fixed level: a different level gives different bytes and so a different digest.
GZIP_LEVEL = 6
EPOCH = "1970-01-01T00:00:00Z"


def canonical_json(value):
    """Bytes of VALUE as compact JSON with sorted keys: the same value, the same digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def walk_sorted(root):
    """Every path under ROOT (relative, '/'-separated), parents before children, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            path = name if rel == "." else os.path.join(rel, name)
            out.append(path.replace(os.sep, "/"))
    return sorted(out)


def tar_layer(root):
    """The uncompressed tar of directory ROOT, normalised so it depends on content only."""
    if not os.path.isdir(root):
        raise SystemExit(f"oci.py: --layer {root}: not a directory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in walk_sorted(root):
            full = os.path.join(root, rel)
            st = os.lstat(full)
            info = tarfile.TarInfo(rel)
            info.mode = stat.S_IMODE(st.st_mode)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(full)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.type = tarfile.REGTYPE
                info.size = st.st_size
                with open(full, "rb") as f:
                    tar.addfile(info, f)
            else:
                raise SystemExit(f"oci.py: {full}: only files, directories and symlinks go in a layer")
    return buf.getvalue()


def key_value(text, flag):
    if "=" not in text:
        raise SystemExit(f"oci.py: {flag} {text!r}: expected K=V")
    return text.split("=", 1)


def json_array(text, flag):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"oci.py: {flag}: not JSON: {e}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SystemExit(f"oci.py: {flag}: expected a JSON array of strings")
    return value


def split_ref(ref):
    """NAME:TAG -> TAG; the tag is after the last ':' that follows the last '/'."""
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last or last.endswith(":"):
        raise SystemExit(f"oci.py: --ref {ref!r}: expected NAME:TAG")
    return last.rsplit(":", 1)[1]


def image_config(args, diff_ids):
    config = {}
    if args.entrypoint is not None:
        config["Entrypoint"] = json_array(args.entrypoint, "--entrypoint")
    if args.cmd is not None:
        config["Cmd"] = json_array(args.cmd, "--cmd")
    if args.env:
        for e in args.env:
            key_value(e, "--env")
        config["Env"] = list(args.env)
    if args.workdir:
        config["WorkingDir"] = args.workdir
    if args.label:
        config["Labels"] = dict(key_value(label, "--label") for label in args.label)
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": EPOCH,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in diff_ids]},
        "history": [{"created": EPOCH, "created_by": "hack/lib/oci.py"} for _ in diff_ids],
    }


def add_bytes(tar, name, data, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar, name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info)


def build(args):
    tag = split_ref(args.ref)
    blobs = {}  # hex digest -> bytes; a dict so a repeated layer is stored once
    layers, diff_ids = [], []
    for layer_dir in args.layer:
        raw = tar_layer(layer_dir)
        diff_ids.append(sha256_hex(raw))
        gz = gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
        digest = sha256_hex(gz)
        blobs[digest] = gz
        layers.append({"mediaType": MEDIA_LAYER_GZIP, "digest": f"sha256:{digest}", "size": len(gz)})

    config = canonical_json(image_config(args, diff_ids))
    config_digest = sha256_hex(config)
    blobs[config_digest] = config
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": f"sha256:{config_digest}", "size": len(config)},
        "layers": layers,
    })
    manifest_digest = sha256_hex(manifest)
    blobs[manifest_digest] = manifest
    index = canonical_json({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": f"sha256:{manifest_digest}",
            "size": len(manifest),
            "annotations": {ANNOTATION_CONTAINERD_NAME: args.ref, ANNOTATION_REF_NAME: tag},
        }],
    })
    docker_manifest = canonical_json([{
        "Config": f"blobs/sha256/{config_digest}",
        "RepoTags": [args.ref],
        "Layers": [f"blobs/sha256/{layer['digest'][len('sha256:'):]}" for layer in layers],
    }])

    # Written next to the target and renamed: a reader never sees half an archive.
    tmp = f"{args.out}.tmp{os.getpid()}"
    try:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            add_bytes(tar, "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
            add_bytes(tar, "index.json", index)
            add_bytes(tar, "manifest.json", docker_manifest)
            add_dir(tar, "blobs")
            add_dir(tar, "blobs/sha256")
            for digest in sorted(blobs):
                add_bytes(tar, f"blobs/sha256/{digest}", blobs[digest])
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    size = os.path.getsize(args.out)
    print(f"{args.ref} sha256:{manifest_digest} {size} bytes -> {args.out}", file=sys.stderr)
    return manifest_digest


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="oci.py", description="Write a deterministic OCI image archive (also docker/podman-loadable).")
    p.add_argument("--out", required=True, help="archive to write (FILE.tar)")
    p.add_argument("--ref", required=True, help="image name with tag, e.g. wgmesh.local/busybox:1.35")
    p.add_argument("--layer", action="append", default=[], metavar="DIR",
                   help="a directory that becomes one layer, bottom first (repeatable)")
    p.add_argument("--entrypoint", metavar="JSON-ARRAY", help='e.g. \'["/pause"]\'')
    p.add_argument("--cmd", metavar="JSON-ARRAY", help='e.g. \'["sh", "-c", "sleep 1d"]\'')
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="repeatable")
    p.add_argument("--workdir", metavar="DIR")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="repeatable")
    build(p.parse_args(argv))


if __name__ == "__main__":
    main()
