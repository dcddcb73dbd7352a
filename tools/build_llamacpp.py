#!/usr/bin/env python3
"""Build llama.cpp's quantize/completion/perplexity tools offline, from a pinned PyPI sdist.

llama.cpp is not packaged for this OS and GitHub is unreachable, but the llama-cpp-python
sdist vendors a full llama.cpp tree (C++ sources, convert_hf_to_gguf.py, gguf-py).
Usage: python3 tools/build_llamacpp.py [--dest DIR] [--portable]   (stdlib only, python >= 3.10)
"""
import argparse, fcntl, hashlib, json, os, shutil, subprocess, sys, tarfile, tempfile, time
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
# Pinned so a changed or tampered upload is caught even if PyPI's metadata agrees with it.
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
SUBMODULE_HEAD = f"llama_cpp_python-{VERSION}/.git/modules/vendor/llama.cpp/HEAD"  # vendored commit
# llama-simple prints with printf: the generation path the project relies on (see tutor_wrap.backends.llamacpp.complete).
# llama-server: the serving check in deploy (the GGUF's chat template through its Jinja engine, on loopback).
TARGETS = ["llama-quantize", "llama-completion", "llama-perplexity", "llama-simple", "llama-server"]
CMAKE_FLAGS = ["-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release",
               # The server target would otherwise try to download its web UI from Hugging Face.
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF"]
# The build is for the CPU it runs on (GGML_NATIVE, -march=native): an AVX-512 machine gets AVX-512 kernels, where a
# portable x86-64-v3 build ran AVX2 code everywhere. The instruction sets it was built with are recorded in
# BUILD_OK.json, and a machine that lacks one of them (a copied .cache, a different VM host) rebuilds instead of
# crashing on an illegal instruction. llama.cpp's runtime-dispatched variants (GGML_BACKEND_DL with
# GGML_CPU_ALL_VARIANTS) would serve every CPU from one build but compile the CPU backend 14 times on x86,
# beyond the build time this project allows on 2 cores.
ISA_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "bmi", "amx", "popcnt", "movbe", "lzcnt", "abm", "gfni",
                "vaes", "vpclmulqdq", "sha_ni", "asimd", "sve", "sme", "i8mm", "bf16", "fphp", "dotprod", "fp16")
SOURCE_MARKER = ".tutor_wrap_source.json"  # lives inside src/, so it moves atomically with it
TARGET_MARKER = ".tutor_wrap_target.json"  # in build/: the CPU target its objects were compiled for


def log(msg):
    print(f"[build_llamacpp] {msg}", flush=True)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(dest):
    """The pinned sdist through `pip download` (so the user's index, mirror and proxy settings apply), checked
    against the pinned sha256 before it takes its final name."""
    final = dest / "downloads" / SDIST
    if final.exists():
        if sha256_of(final) == SHA256:
            return final
        log(f"cached {final} has the wrong sha256, downloading again")
        final.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    final.with_name(SDIST + ".part").unlink(missing_ok=True)   # left by an interrupted download of older versions
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=final.parent) as tmp:
        log(f"pip download llama-cpp-python=={VERSION} (the sdist; pip prepares its metadata, about a minute)")
        rc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                             "--disable-pip-version-check", "--quiet", f"llama-cpp-python=={VERSION}", "-d", tmp]).returncode
        got = Path(tmp) / SDIST
        if rc != 0 or not got.is_file():
            sys.exit(f"pip download of llama-cpp-python=={VERSION} failed (exit {rc}); check pip's index and proxy "
                     "settings (pip config list)")
        digest = sha256_of(got)
        if digest != SHA256:
            sys.exit(f"sha256 mismatch for {SDIST} from pip's index: got {digest}, expected {SHA256}")
        os.replace(got, final)  # only a verified file ever carries the final name
    return final


def extract(tarball, dest):
    tmp = Path(tempfile.mkdtemp(prefix="src.tmp-", dir=dest))
    log(f"extracting vendor/llama.cpp to {dest / 'src'}")
    commit = "unknown"
    with tarfile.open(tarball) as tar:
        members = []
        for m in tar:
            if m.name == SUBMODULE_HEAD:
                commit = tar.extractfile(m).read().decode().strip()
            # Skip the submodule's `.git` pointer: it is dangling here, and git must not
            # mistake the tree for (or climb out of it into) some other repository.
            if not m.isfile() or not m.name.startswith(VENDOR) or m.name == VENDOR + ".git":
                continue
            m.name = m.name[len(VENDOR):]
            if os.path.isabs(m.name) or ".." in Path(m.name).parts:
                sys.exit(f"unsafe path in {tarball}: {m.name}")
            members.append(m)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **extra)
    (tmp / SOURCE_MARKER).write_text(json.dumps({"sha256": SHA256, "commit": commit}))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    os.rename(tmp, dest / "src")  # a half-extracted tree never sits at src/


def cpu_isa(cpuinfo=None):
    """The instruction-set flags of this CPU that a native build may use (x86 `flags`, ARM `Features`)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return []
    words = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words.update(value.split())
    return sorted(w for w in words if w.startswith(ISA_PREFIXES) and w not in ("smep", "smap"))


def built_for_here(info, portable):
    """Whether a recorded build is the one this machine wants: a native build made on a CPU with exactly these
    instruction sets (one from a lesser CPU runs, but slower than it should; one from a greater CPU crashes), or a
    portable build whose instruction sets this CPU has."""
    want = target(portable)
    if info.get("cpu_target") != want[2]:
        return False
    return set(info.get("cpu_isa", [])) <= set(cpu_isa()) if portable else info.get("cpu_isa") == want[1]


# --portable (container images, which run on CPUs other than the one that built them): the x86-64-v3 set, which any
# x86 machine from the last decade has. GGML_NATIVE=OFF alone would drop every SIMD extension.
X86_V3 = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "sse4_2": "SSE42"}


def target(portable):
    """(cmake flags for the CPU code, the instruction sets the binaries will need, a name for the record)."""
    if not portable:
        return ["-DGGML_NATIVE=ON"], cpu_isa(), "native"
    if os.uname().machine == "x86_64" and set(X86_V3) <= set(cpu_isa()):
        return (["-DGGML_NATIVE=OFF", *(f"-DGGML_{name}=ON" for name in X86_V3.values())], sorted(X86_V3),
                "portable x86-64-v3")
    return ["-DGGML_NATIVE=OFF"], [], "portable"


def run_logged(cmd, logf, env):
    print(f"\n$ {' '.join(cmd)}", file=logf, flush=True)
    return subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env).returncode


def build(dest, commit, cpu_flags):
    src, build_dir, log_path = dest / "src", dest / "src" / "build", dest / "build.log"
    # Without a ceiling, llama.cpp's build-info would take the commit of whatever git repo
    # encloses DIR (e.g. tutor_wrap itself) as the llama.cpp version.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(dest))
    configure = ["cmake", "-S", str(src), "-B", str(build_dir), *cpu_flags, *CMAKE_FLAGS,
                 f"-DLLAMA_BUILD_COMMIT={commit[:7]}"]
    jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with open(log_path, "w") as logf:
        log("configuring")
        rc = run_logged(configure, logf, env)
        if rc != 0 and build_dir.exists():  # a cache left by an interrupted configure; start over
            shutil.rmtree(build_dir)
            rc = run_logged(configure, logf, env)
        if rc == 0:
            log(f"building {', '.join(TARGETS)} with -j {jobs} (about 15 min on 2 cores, llama-server the largest part); log: {log_path}")
            t0 = time.monotonic()
            rc = run_logged(["cmake", "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs)],
                            logf, env)
            log(f"build finished in {time.monotonic() - t0:.0f} s")
    if rc != 0:
        print("".join(log_path.read_text(errors="replace").splitlines(True)[-40:]), file=sys.stderr)
        sys.exit(f"llama.cpp build failed (exit {rc}); full log: {log_path}")


def install(dest, ok_file, bin_dir, portable=False):
    ok_file.unlink(missing_ok=True)
    for stale in dest.glob("src.tmp-*"):  # left by an interrupted extraction
        shutil.rmtree(stale)
    tarball, src = download(dest), dest / "src"
    try:
        marker = json.loads((src / SOURCE_MARKER).read_text())
    except (OSError, ValueError):
        marker = {}
    if marker.get("sha256") != SHA256:
        if src.exists():  # another pin's tree, or one of unknown origin: start from scratch
            shutil.rmtree(src)
        extract(tarball, dest)
        marker = json.loads((src / SOURCE_MARKER).read_text())
    cpu_flags, isa, cpu_target = target(portable)
    build_dir = dest / "src" / "build"
    try:
        compiled_for = json.loads((build_dir / TARGET_MARKER).read_text())
    except (OSError, ValueError):
        compiled_for = None
    want = {"cpu_target": cpu_target, "cpu_isa": isa}
    if build_dir.exists() and compiled_for != want:
        # Objects compiled for another CPU or target: -march=native reads the same everywhere, so make would keep them.
        was = (f"{compiled_for.get('cpu_target')} on a CPU with other instruction sets" if compiled_for
               else "an unrecorded target (a build from an older tutor_wrap)")
        log(f"the build dir was compiled for {was}: starting it over")
        shutil.rmtree(build_dir)
    # Recorded before compiling: an interrupted build for this same target resumes where make stopped.
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / TARGET_MARKER).write_text(json.dumps(want))
    build(dest, marker["commit"], cpu_flags)
    # Catches binaries that link but cannot load their shared libraries.
    if subprocess.run([str(bin_dir / "llama-completion"), "--version"], capture_output=True).returncode:
        sys.exit(f"{bin_dir / 'llama-completion'} --version failed; see {dest / 'build.log'}")
    info = {"llama_cpp_python": VERSION, "llama_cpp_build": marker["commit"],
            "cpu_target": cpu_target, "cpu_isa": isa, "bin_dir": "src/build/bin", "converter": "src/convert_hf_to_gguf.py",
            "gguf_py": "src/gguf-py", "sha256": SHA256}
    tmp = ok_file.with_name(ok_file.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, ok_file)


def main():
    repo = Path(__file__).resolve().parent.parent
    cache = Path(os.environ.get("TUTOR_WRAP_CACHE") or repo / ".cache")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=cache / "llama.cpp",
                    help=f"where the sdist, sources and build go (default: {cache / 'llama.cpp'})")
    ap.add_argument("--portable", action="store_true",
                    help="binaries for any x86-64-v3 CPU instead of this one's (container images)")
    args = ap.parse_args()
    dest = args.dest.resolve()
    ok_file, bin_dir = dest / "BUILD_OK.json", dest / "src" / "build" / "bin"

    def ready():
        try:
            info = json.loads(ok_file.read_text())
        except (OSError, ValueError):
            return False
        if info.get("sha256") != SHA256 or not all(os.access(bin_dir / t, os.X_OK) for t in TARGETS):
            return False
        return built_for_here(info, args.portable)

    if not ready():
        dest.mkdir(parents=True, exist_ok=True)
        with open(dest / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # serialise concurrent runs on the same DIR
            if not ready():  # a run we waited for may have finished the job
                install(dest, ok_file, bin_dir, args.portable)
    log(f"llama.cpp ready at {dest}")


if __name__ == "__main__":
    main()
