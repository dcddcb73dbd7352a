#!/usr/bin/env python3
"""Build llama.cpp's quantize/completion/perplexity tools offline, from a pinned PyPI sdist.

llama.cpp is not packaged for this OS and GitHub is unreachable, but the llama-cpp-python
sdist vendors a full llama.cpp tree (C++ sources, convert_hf_to_gguf.py, gguf-py).
Usage: python3 tools/build_llamacpp.py [--dest DIR] [--portable] [--backend auto|cpu|cuda|hip|vulkan]
(stdlib only, python >= 3.10)
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
    # A second build (another --dest, e.g. the tests' Vulkan one) takes the default build's verified copy.
    sibling = dest.parent / "llama.cpp" / "downloads" / SDIST
    if sibling != final and sibling.is_file() and sha256_of(sibling) == SHA256:
        shutil.copyfile(sibling, final.with_name(SDIST + ".copy"))
        os.replace(final.with_name(SDIST + ".copy"), final)
        return final
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


# The GPU backends: llama.cpp's export checks, serving check and eval run on the GPU the machine has when its build
# has that backend. `auto` picks from the GPUs present and the toolchains installed, and says why; the choice is
# recorded in BUILD_OK.json (tutor_wrap reads it, and lists the devices the build sees: llama-server --list-devices).
BACKENDS = ("auto", "cpu", "cuda", "hip", "vulkan")
# ggml-vulkan.cpp of the pinned llama.cpp uses vk::LayerSettingEXT (Vulkan-Headers 1.3.261+); Debian 12 ships 1.3.239.
# Debian 13's libvulkan-dev carries headers that build it against Debian 12's loader, glslc and SPIR-V headers; it
# is fetched by apt itself (the machine's mirror and proxy settings) into the cache, never installed system-wide.
VULKAN_HEADERS_DEB = ("trixie", "libvulkan-dev")
VULKAN_APT = "apt-get install -y libvulkan-dev glslc spirv-headers glslang-tools"


def _out(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def cuda_archs():
    """The compute capabilities of the NVIDIA GPUs present, as CMake wants them ('8.6' -> '86'); [] without one."""
    out = _out(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]) or ""
    return sorted({c.strip().replace(".", "") for c in out.splitlines() if c.strip()})


def hip_targets():
    """The gfx names of the AMD GPUs ROCm sees; [] without one."""
    import re

    out = _out(["rocminfo"]) or ""
    return sorted(set(re.findall(r"^\s*Name:\s+(gfx[0-9a-f]+)\s*$", out, re.M)))


def vulkan_gpus():
    """The Vulkan devices that are GPUs (a software rasterizer such as lavapipe is not one: ggml-vulkan skips it)."""
    out = _out(["vulkaninfo", "--summary"]) or ""
    gpus, name = [], None
    for line in out.splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() == "deviceName":
            name = value.strip()
        elif key.strip() == "deviceType" and "GPU" in value and name:
            gpus.append(name)
    return gpus


def _cuda(asked):
    """((cmake flags, environment, why), None) for a CUDA build here, or (None, what is missing)."""
    archs, nvcc = cuda_archs(), _nvcc()
    if archs and nvcc:
        return (["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}"], {},
                f"CUDA: NVIDIA GPU(s) of compute capability {', '.join(archs)} and {nvcc}"), None
    return None, ("no CUDA toolkit (nvcc): install it (e.g. apt-get install nvidia-cuda-toolkit, or NVIDIA's "
                  "cuda-toolkit package) and run this again" if archs else
                  "no NVIDIA GPU found (nvidia-smi is missing or lists none): check the driver, or build for what "
                  "this machine has with --backend auto")


def _hip(asked):
    gfx, hipconfig = hip_targets(), shutil.which("hipconfig")
    if gfx and hipconfig:
        root = (_out([hipconfig, "-R"]) or "/opt/rocm").strip()
        clang = (_out([hipconfig, "-l"]) or f"{root}/llvm/bin").strip() + "/clang"
        return (["-DGGML_HIP=ON", f"-DGPU_TARGETS={';'.join(gfx)}"], {"HIPCXX": clang, "HIP_PATH": root},
                f"HIP: AMD GPU(s) {', '.join(gfx)} and ROCm at {root}"), None
    return None, ("no ROCm HIP toolchain (hipconfig): install ROCm's hip-dev (amdgpu-install --usecase=hiplibsdk) "
                  "and run this again" if gfx else "no AMD GPU found (rocminfo is missing or lists none): check ROCm's "
                  "driver, or build for what this machine has with --backend auto")


def _vulkan(asked):
    """Asked for by name, Vulkan is built without a Vulkan GPU too (the tests' software device)."""
    gpus, glslc = vulkan_gpus(), shutil.which("glslc")
    if not gpus and asked != "vulkan":
        return None, "no Vulkan GPU (vulkaninfo)"
    if not glslc or not Path("/usr/include/vulkan/vulkan.h").is_file():
        return None, f"the Vulkan SDK parts are missing: {VULKAN_APT}"
    return (["-DGGML_VULKAN=ON"], {},
            f"Vulkan: {', '.join(gpus)}" if gpus else "Vulkan, as asked (no Vulkan GPU is listed here: the build "
                                                       "runs, ggml uses a device only when it is a GPU or named by "
                                                       "GGML_VK_VISIBLE_DEVICES)"), None


# In the order `auto` tries them; a backend is one function above and one line here.
GPU_BACKENDS = (("cuda", _cuda), ("hip", _hip), ("vulkan", _vulkan))


def choose_backend(asked):
    """(backend, cmake flags, extra environment, why) for `asked`; an explicit backend whose toolchain is missing
    exits with the step to install it."""
    missing = []
    for name, detect in GPU_BACKENDS:
        if asked not in ("auto", name):
            continue
        found, lacking = detect(asked)
        if found:
            return (name, *found)
        if asked == name:
            sys.exit(f"--backend {name}: {lacking}")
        missing.append(f"{name}: {lacking.split(': ')[0]}")   # what is missing; the step is for an explicit ask
    return "cpu", [], {}, "CPU" + (f" ({'; '.join(missing)})" if missing else ", as asked")


def vulkan_headers(dest):
    """Include dir with Vulkan headers new enough for ggml-vulkan: the system's when they are, else Debian 13's
    libvulkan-dev unpacked into DEST/vulkan-headers by apt-get download with a private source list and state."""
    hpp = Path("/usr/include/vulkan/vulkan_structs.hpp")
    if hpp.is_file() and "struct LayerSettingEXT" in hpp.read_text(errors="replace"):
        return None
    out = dest / "vulkan-headers"
    if (out / "usr/include/vulkan/vulkan_structs.hpp").is_file():
        return out / "usr/include"
    if not shutil.which("apt-get"):
        sys.exit("the system's Vulkan headers are older than 1.3.261 (ggml-vulkan needs vk::LayerSettingEXT) and this "
                 "is not a Debian-family system to fetch newer ones from: install Vulkan-Headers 1.3.261 or newer")
    suite, pkg = VULKAN_HEADERS_DEB
    apt = dest / "apt"
    for d in ("state/lists/partial", "cache/archives/partial", "debs"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    mirror = _debian_mirror()
    (apt / "debian.sources").write_text(f"Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n"
                                 "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    opts = [f"-oDir::Etc::SourceList={apt / 'debian.sources'}", "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State={apt / 'state'}", f"-oDir::Cache={apt / 'cache'}", "-oDir::State::status=/var/lib/dpkg/status",
            "-oDebug::NoLocking=1", "-qq", *(["-oAPT::Sandbox::User=root"] if os.geteuid() == 0 else [])]
    log(f"the system's Vulkan headers are too old for ggml-vulkan: fetching Debian {suite}'s {pkg} (headers only, "
        f"into {out}) with apt-get from {mirror}")
    for cmd, cwd in ((["apt-get", *opts, "update"], None), (["apt-get", *opts, "download", pkg], apt / "debs")):
        if subprocess.run(cmd, cwd=cwd).returncode != 0:
            sys.exit(f"`{' '.join(cmd)}` failed: check apt's proxy settings, or install Vulkan-Headers 1.3.261+")
    (deb,) = sorted((apt / "debs").glob(f"{pkg}_*.deb"))[-1:]
    tmp = Path(tempfile.mkdtemp(prefix="vulkan-headers.tmp-", dir=dest))
    if subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)]).returncode != 0:
        sys.exit(f"dpkg-deb -x {deb} failed")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out / "usr/include"


def _debian_mirror():
    """The Debian mirror this machine's apt already uses (so its proxy and mirror choice apply)."""
    import re

    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for m in re.finditer(r"(?:^URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(https?://\S+/debian)/?\s", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def run_logged(cmd, logf, env):
    print(f"\n$ {' '.join(cmd)}", file=logf, flush=True)
    return subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env).returncode


def build(dest, commit, cpu_flags, backend_flags=(), backend_env=None):
    src, build_dir, log_path = dest / "src", dest / "src" / "build", dest / "build.log"
    # Without a ceiling, llama.cpp's build-info would take the commit of whatever git repo
    # encloses DIR (e.g. tutor_wrap itself) as the llama.cpp version.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(dest), **(backend_env or {}))
    configure = ["cmake", "-S", str(src), "-B", str(build_dir), *cpu_flags, *backend_flags, *CMAKE_FLAGS,
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


def install(dest, ok_file, bin_dir, portable=False, backend=("cpu", [], {}, "CPU")):
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
    name, backend_flags, backend_env, why = backend
    want = {"cpu_target": cpu_target, "cpu_isa": isa, **({"backend": name} if name != "cpu" else {})}
    if build_dir.exists() and compiled_for != want:
        # Objects compiled for another CPU or target: -march=native reads the same everywhere, so make would keep them.
        was = (f"{compiled_for.get('cpu_target')} on a CPU with other instruction sets" if compiled_for
               else "an unrecorded target (a build from an older tutor_wrap)")
        log(f"the build dir was compiled for {was}: starting it over")
        shutil.rmtree(build_dir)
    # Recorded before compiling: an interrupted build for this same target resumes where make stopped.
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / TARGET_MARKER).write_text(json.dumps(want))
    if name == "vulkan" and (include := vulkan_headers(dest)):
        backend_flags = [*backend_flags, f"-DVulkan_INCLUDE_DIR={include}"]
    build(dest, marker["commit"], cpu_flags, backend_flags, backend_env)
    # Catches binaries that link but cannot load their shared libraries.
    if subprocess.run([str(bin_dir / "llama-completion"), "--version"], capture_output=True).returncode:
        sys.exit(f"{bin_dir / 'llama-completion'} --version failed; see {dest / 'build.log'}")
    info = {"llama_cpp_python": VERSION, "llama_cpp_build": marker["commit"],
            "cpu_target": cpu_target, "cpu_isa": isa, "bin_dir": "src/build/bin", "converter": "src/convert_hf_to_gguf.py",
            "gguf_py": "src/gguf-py", "sha256": SHA256, "backend": name, "backend_reason": why}
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
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="the GPU backend to build in (default auto: CUDA with an NVIDIA GPU and nvcc, HIP with an "
                         "AMD GPU and ROCm, Vulkan with a Vulkan GPU and glslc, else the CPU only)")
    args = ap.parse_args()
    dest = args.dest.resolve()
    ok_file, bin_dir = dest / "BUILD_OK.json", dest / "src" / "build" / "bin"
    backend = choose_backend(args.backend)
    log(f"backend: {backend[3]}")

    def ready():
        try:
            info = json.loads(ok_file.read_text())
        except (OSError, ValueError):
            return False
        if info.get("sha256") != SHA256 or not all(os.access(bin_dir / t, os.X_OK) for t in TARGETS):
            return False
        if info.get("backend", "cpu") != backend[0]:   # a GPU (or its toolchain) came or went
            return False
        return built_for_here(info, args.portable)

    if not ready():
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            sys.exit(f"--dest {dest}: cannot make the build folder there ({exc.strerror}); choose another")
        try:
            was = json.loads(ok_file.read_text()).get("backend", "cpu")
        except (OSError, ValueError):
            was = None
        if was and was != backend[0]:
            log(f"the build in {dest} is for the {was} backend: rebuilding it for {backend[0]} (another --dest keeps "
                "both)")
        with open(dest / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # serialise concurrent runs on the same DIR
            if not ready():  # a run we waited for may have finished the job
                install(dest, ok_file, bin_dir, args.portable, backend)
    log(f"llama.cpp ready at {dest}")


if __name__ == "__main__":
    main()
