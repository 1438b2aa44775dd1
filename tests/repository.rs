//! The repository stands alone and stays small: what the docs promise a reader is checked here,
//! so a benchmark run left uncited, a link to a run that was dropped, or a doc pointing outside
//! the repository fails the suite instead of a newcomer.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Files under `dir`, skipping the folders `bench/.gitignore` keeps out of git.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "logs" && name != "plot-data" {
                out.extend(files(&path));
            }
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn every_kept_benchmark_run_is_cited_and_every_cited_file_is_kept() {
    let bench = root().join("bench");
    let results = std::fs::read_to_string(bench.join("RESULTS.md")).unwrap();
    for entry in std::fs::read_dir(bench.join("results")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            results.contains(&name),
            "bench/results/{name} is not cited in bench/RESULTS.md: cite it or drop it"
        );
    }
    for link in results.split("](results/").skip(1) {
        let target = &link[..link.find(')').unwrap()];
        assert!(
            bench.join("results").join(target).exists(),
            "bench/RESULTS.md links to results/{target}, which is not there"
        );
    }
}

#[test]
fn kept_benchmark_data_stays_small() {
    let bytes: u64 = files(&root().join("bench/results"))
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(
        bytes < 5_000_000,
        "bench/results holds {bytes} bytes: trim runs with bench/trim.py or drop old ones"
    );
}

#[test]
fn docs_point_at_nothing_outside_the_repository() {
    let root = root();
    let mut docs = vec![root.join("README.md"), root.join("SECURITY.md")];
    for dir in ["docs", "bench", "docker", "deploy"] {
        docs.extend(files(&root.join(dir)).into_iter().filter(|f| {
            !f.starts_with(root.join("bench/results")) && !f.starts_with(root.join("bench/out"))
        }));
    }
    for doc in docs {
        let Ok(text) = std::fs::read_to_string(&doc) else {
            continue; // not text (a plot)
        };
        for needle in ["../shared", "/work/shared"] {
            assert!(
                !text.contains(needle),
                "{} points at {needle}, outside the repository",
                doc.display()
            );
        }
    }
}
