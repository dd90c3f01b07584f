//! The hardened OCI bundle a sandbox runs from: its `config.json` and the
//! process spec of each exec.

use std::path::{Path, PathBuf};

use crate::config::Config;

use super::{GVISOR_PIDS_ALLOWANCE, LaunchError, LaunchSpec};

fn capabilities(config: &Config) -> Result<oci_spec::runtime::Capabilities, LaunchError> {
    config
        .sandbox
        .capabilities
        .iter()
        .map(|c| {
            serde_json::from_value(serde_json::Value::String(c.clone()))
                .map_err(|_| LaunchError::Unavailable(format!("sandbox.capabilities: unknown {c}")))
        })
        .collect()
}

/// The hardened process: the sandbox's user, only the configured
/// capabilities, no_new_privileges, a descriptor limit.
fn process(
    config: &Config,
    args: &[String],
    env: &[String],
) -> Result<oci_spec::runtime::Process, LaunchError> {
    use oci_spec::runtime::{
        LinuxCapabilitiesBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, UserBuilder,
    };
    let err = LaunchError::Spec;
    let caps = capabilities(config)?;
    ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(config.sandbox.uid)
                .gid(config.sandbox.gid)
                .build()
                .map_err(err)?,
        )
        .args(args.to_vec())
        .env(env.to_vec())
        .cwd("/")
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .inheritable(caps.clone())
                .permitted(caps.clone())
                .ambient(caps)
                .build()
                .map_err(err)?,
        )
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .hard(4096u64)
                .soft(1024u64)
                .build()
                .map_err(err)?,
        ])
        .no_new_privileges(true)
        .build()
        .map_err(err)
}

pub(super) fn process_json(
    config: &Config,
    args: &[String],
    env: &[String],
) -> Result<Vec<u8>, LaunchError> {
    serde_json::to_vec_pretty(&process(config, args, env)?).map_err(LaunchError::Json)
}

/// The OCI bundle's `config.json` for one sandbox.
pub fn bundle_config(
    config: &Config,
    spec: &LaunchSpec,
    user_mounts: &[(PathBuf, &str, bool)],
) -> Result<Vec<u8>, LaunchError> {
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceType, LinuxPidsBuilder,
        LinuxResourcesBuilder, MountBuilder, RootBuilder, Spec,
    };
    let err = LaunchError::Spec;
    let rootfs = config.sandbox.rootfs.canonicalize().map_err(|e| {
        LaunchError::Unavailable(format!(
            "sandbox.rootfs {}: {e}",
            config.sandbox.rootfs.display()
        ))
    })?;
    let mut oci = Spec::default();
    oci.set_hostname(Some(spec.container_id.clone()));
    oci.set_root(Some(
        RootBuilder::default()
            .path(rootfs)
            .readonly(true)
            .build()
            .map_err(err)?,
    ));
    oci.set_process(Some(process(config, &spec.command, &spec.env)?));

    let mut mounts = oci.mounts().clone().unwrap_or_default();
    mounts.retain(|m| m.destination() != Path::new("/tmp"));
    mounts.push(
        MountBuilder::default()
            .destination("/tmp")
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec![
                "nosuid".into(),
                "nodev".into(),
                "mode=1777".into(),
                format!("size={}", config.sandbox.tmp_size_bytes),
            ])
            .build()
            .map_err(err)?,
    );
    for (source, target, writable) in user_mounts {
        mounts.push(
            MountBuilder::default()
                .destination(*target)
                .typ("bind")
                .source(source)
                .options(vec![
                    "rbind".into(),
                    "nosuid".into(),
                    "nodev".into(),
                    if *writable { "rw".into() } else { "ro".into() },
                ])
                .build()
                .map_err(err)?,
        );
    }
    oci.set_mounts(Some(mounts));

    if let Some(linux) = oci.linux_mut() {
        // The network is the namespace runsc is started in (the sandbox's).
        let namespaces = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        linux.set_namespaces(Some(namespaces));
        let period = 100_000u64;
        linux.set_resources(Some(
            LinuxResourcesBuilder::default()
                .memory(
                    LinuxMemoryBuilder::default()
                        .limit(spec.memory_bytes as i64)
                        .build()
                        .map_err(err)?,
                )
                .cpu(
                    LinuxCpuBuilder::default()
                        .period(period)
                        .quota((spec.cpu_millis * period / 1000) as i64)
                        .build()
                        .map_err(err)?,
                )
                .pids(
                    LinuxPidsBuilder::default()
                        .limit(spec.pids_limit.saturating_add(GVISOR_PIDS_ALLOWANCE))
                        .build()
                        .map_err(err)?,
                )
                .build()
                .map_err(err)?,
        ));
        linux.set_cgroups_path(Some(PathBuf::from(format!(
            "/sluice/{}",
            spec.container_id
        ))));
    }
    serde_json::to_vec_pretty(&oci).map_err(LaunchError::Json)
}
