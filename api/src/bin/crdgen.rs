//! `crdgen`: writes wgmesh's CustomResourceDefinitions as YAML.
//!
//! `crdgen` prints all of them to stdout as one multi-document stream;
//! `crdgen --out-dir crds` writes one file per definition, which is how `crds/` is made.

use std::{fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {
            for crd in wgmesh_api::crds() {
                match wgmesh_api::crd_yaml(&crd) {
                    Ok(yaml) => print!("---\n{yaml}"),
                    Err(e) => return fail(&format!("rendering CRD: {e}")),
                }
            }
            ExitCode::SUCCESS
        }
        [flag, dir] if flag == "--out-dir" => {
            let dir = PathBuf::from(dir);
            if let Err(e) = fs::create_dir_all(&dir) {
                return fail(&format!("creating {}: {e}", dir.display()));
            }
            for crd in wgmesh_api::crds() {
                let path = dir.join(wgmesh_api::crd_file_name(&crd));
                let yaml = match wgmesh_api::crd_yaml(&crd) {
                    Ok(yaml) => yaml,
                    Err(e) => return fail(&format!("rendering CRD: {e}")),
                };
                if let Err(e) = fs::write(&path, yaml) {
                    return fail(&format!("writing {}: {e}", path.display()));
                }
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        [flag] if flag == "--help" || flag == "-h" => {
            println!(
                "crdgen: print wgmesh's CustomResourceDefinitions as YAML\n\n\
                 Usage:\n  crdgen                  print every CRD to stdout\n  \
                 crdgen --out-dir DIR    write one file per CRD into DIR (crds/ is made this way)"
            );
            ExitCode::SUCCESS
        }
        _ => fail("usage: crdgen [--out-dir DIR]  (see --help)"),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("crdgen: {msg}");
    ExitCode::FAILURE
}
