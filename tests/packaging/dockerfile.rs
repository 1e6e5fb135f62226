//! No image can be built here (no container engine), so the Dockerfile's build stage is replayed:
//! its COPY instructions into a fresh directory, then every cargo command it runs, with its ENV.
//! A source file the build needs but the Dockerfile does not copy, or a changed build command
//! that no longer produces the binary the final stage copies, fails this test.

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hash, Hasher},
    path::{Path, PathBuf},
    process::Command,
};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// One instruction: its keyword and its arguments, continuation lines joined.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (keyword, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((keyword.to_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// `ENV a=b c="d e"` as pairs.
fn env_pairs(args: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = args.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').expect("closing quote in ENV");
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(' ').unwrap_or((after, "")),
        };
        pairs.push((key.trim().to_string(), value.to_string()));
        rest = next.trim();
    }
    pairs
}

/// Copies a file or a directory tree, hashing names and contents into the layer's key.
fn copy_into(from: &Path, to: &Path, layer: &mut DefaultHasher) {
    if from.is_dir() {
        std::fs::create_dir_all(to).expect("create directory");
        let mut entries: Vec<_> = std::fs::read_dir(from)
            .expect("read directory")
            .map(|e| e.expect("directory entry"))
            .collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            entry.file_name().hash(layer);
            copy_into(&entry.path(), &to.join(entry.file_name()), layer);
        }
    } else {
        std::fs::read(from).expect("read a copied file").hash(layer);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).expect("create directory");
        }
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        // As Docker's COPY: the file keeps its modification time, so a build stage that relies on
        // mtimes (the dependency layer's stubs) is replayed faithfully.
        let modified = std::fs::metadata(from)
            .and_then(|m| m.modified())
            .expect("modification time");
        std::fs::File::options()
            .write(true)
            .open(to)
            .and_then(|f| f.set_modified(modified))
            .expect("keep the modification time");
    }
}

#[test]
fn the_dockerfile_build_stage_builds_a_stamped_binary_from_what_it_copies() {
    let dockerfile = std::fs::read_to_string(Path::new(REPO).join("Dockerfile")).expect("read");
    let all = instructions(&dockerfile);
    let stages: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let build = &all[stages[0]..stages[1]];
    let runtime = &all[stages[1]..];
    assert!(build[0].1.ends_with(" AS build"), "{:?}", build[0]);
    assert_eq!(runtime[0].1, "scratch", "a minimal runtime image");

    let target = Path::new(REPO).join("target").join("dockerfile");
    // One fixed directory, as the image's /src: cargo's fingerprints hold paths.
    let context = target.join("context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).expect("create the context directory");
    let ignored = dockerignore();
    let mut workdir = PathBuf::from("/");
    let mut env = BTreeMap::new();
    let commit = "0123456789abcdef";
    env.insert("COMMIT".to_string(), commit.to_string());
    let mut cargo_runs = 0;
    // Layer caching as Docker does it: a RUN is skipped when every instruction before it, and
    // every file copied before it, is what it was when it last succeeded. So an unchanged
    // Dockerfile and source tree cost nothing, and any change that could break the build runs it.
    let mut layer = DefaultHasher::new();
    for (keyword, args) in build {
        (keyword, args).hash(&mut layer);
        match keyword.as_str() {
            "WORKDIR" => workdir = workdir.join(args),
            "ENV" => env.extend(env_pairs(args)),
            "COPY" => {
                let parts: Vec<&str> = args.split_whitespace().collect();
                let (dest, sources) = parts.split_last().expect("COPY has a destination");
                let into_dir = sources.len() > 1 || dest.ends_with('/');
                let dest = context.join(workdir.join(dest).strip_prefix("/").expect("absolute"));
                for source in sources {
                    assert!(
                        !ignored.iter().any(|i| Path::new(source).starts_with(i)),
                        "COPY {source}, which .dockerignore leaves out of the build context"
                    );
                    let from = Path::new(REPO).join(source);
                    let name = from.file_name().expect("a named source");
                    // `COPY dir ./dir` copies the directory's contents; `COPY f ./d/` into d.
                    let to = if into_dir {
                        dest.join(name)
                    } else {
                        dest.clone()
                    };
                    copy_into(&from, &to, &mut layer);
                }
            }
            "RUN" if args.contains("cargo ") => {
                cargo_runs += 1;
                let marker = target.join(format!("layer-{cargo_runs}"));
                let key = format!("{:x}", layer.finish());
                let snapshot = target.join(format!("layer-{cargo_runs}.files"));
                if std::fs::read_to_string(&marker).is_ok_and(|k| k == key) && snapshot.is_dir() {
                    // A cached layer brings back the files it left, as Docker's does.
                    let _ = std::fs::remove_dir_all(&context);
                    copy_tree(&snapshot, &context);
                    continue;
                }
                let dir = context.join(workdir.strip_prefix("/").expect("absolute"));
                let status = Command::new("sh")
                    .args(["-ec", args])
                    .current_dir(&dir)
                    .envs(&env)
                    // Kept apart from the test build's target directory (other RUSTFLAGS), and
                    // kept across runs like the image's dependency layer.
                    .env("CARGO_TARGET_DIR", &target)
                    .status()
                    .expect("run sh");
                assert!(status.success(), "`{args}` failed: {status}");
                let _ = std::fs::remove_dir_all(&snapshot);
                copy_tree(&context, &snapshot);
                std::fs::write(&marker, key).expect("record the layer");
            }
            _ => {}
        }
    }
    assert_eq!(cargo_runs, 2, "a dependency layer, then the build");

    // The runtime stage copies what the build produced, from where it produced it.
    let copied = runtime
        .iter()
        .find(|(k, a)| k == "COPY" && a.starts_with("--from=build"))
        .map(|(_, a)| a.split_whitespace().nth(1).expect("a source").to_string())
        .expect("the runtime stage copies the binary");
    assert_eq!(Path::new(&copied), workdir.join("target/release/roster"));
    let binary = target.join("release/roster");
    let version = Command::new(&binary)
        .arg("--version")
        .output()
        .expect("run the built binary");
    let version = String::from_utf8_lossy(&version.stdout);
    assert_eq!(
        version.trim(),
        format!("roster {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
    // It runs as the chart's non-root user.
    assert!(
        runtime
            .iter()
            .any(|(k, a)| k == "USER" && a == "65532:65532")
    );
    let _ = std::fs::remove_dir_all(&context);
}

/// Copies a directory tree, keeping modification times (a layer's files, saved or restored).
fn copy_tree(from: &Path, to: &Path) {
    copy_into(from, to, &mut DefaultHasher::new());
}

/// The paths `.dockerignore` leaves out of the build context (its plain entries; it has no
/// patterns).
fn dockerignore() -> Vec<PathBuf> {
    std::fs::read_to_string(Path::new(REPO).join(".dockerignore"))
        .expect("read .dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| PathBuf::from(l.trim_end_matches('/')))
        .collect()
}
