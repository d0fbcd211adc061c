//! A virtual machine booted from the appliance image under qemu, reached over
//! forwarded loopback ports (HTTP and SSH), with a seed drive of the test's
//! own. qemu is killed by its pid and the VM's files removed on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::http::run_ok;

/// The UEFI firmware (Debian's ovmf): code read-only, variables per VM.
const FIRMWARE_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const FIRMWARE_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The gateway's port inside the VM that the host reaches.
pub const GUEST_HTTP: u16 = 8080;

/// One booted VM.
#[derive(Debug)]
pub struct Vm {
    dir: PathBuf,
    qemu: Child,
    key: PathBuf,
    /// Host loopback address forwarded to the gateway's port in the VM.
    pub http: SocketAddr,
    ssh_port: u16,
    /// When qemu was started.
    pub started: Instant,
    /// How the CPU is run (`kvm` or `tcg`) and why.
    pub accel: String,
}

/// How this machine can run the image's stock Debian kernel.
fn accelerator() -> (Vec<&'static str>, String) {
    if Path::new("/sys/module/kvm_pvm").exists() {
        // PVM (a software KVM for nested machines) runs only kernels built as
        // PVM guests; Debian's kernel is not one, so qemu emulates the CPU.
        (
            vec!["-accel", "tcg,thread=multi", "-cpu", "max"],
            "tcg: /dev/kvm here is kvm_pvm, which runs only PVM guest kernels".into(),
        )
    } else if Path::new("/dev/kvm").exists() {
        (vec!["-enable-kvm", "-cpu", "qemu64"], "kvm".into())
    } else {
        (
            vec!["-accel", "tcg,thread=multi", "-cpu", "max"],
            "tcg: no /dev/kvm".into(),
        )
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Vm {
    /// Boots `image` (through a copy-on-write overlay: the image stays as
    /// built) with `seed` as its seed drive, and an SSH key of its own added
    /// to the seed's `authorized_keys`.
    pub fn boot(image: &Path, seed: &Path) -> anyhow::Result<Self> {
        let dir = PathBuf::from("/var/tmp").join(crate::unique_name("pcvm"));
        std::fs::create_dir_all(&dir)?;
        let key = dir.join("key");
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", ""])
                .arg("-f")
                .arg(&key),
        )?;
        std::fs::copy(key.with_extension("pub"), seed.join("authorized_keys"))?;
        let seed_img = dir.join("seed.ext4");
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-L", "PORTCULLIS-SEED", "-d"])
                .arg(seed)
                .arg(&seed_img)
                .arg("64M"),
        )?;
        let overlay = dir.join("disk.qcow2");
        run_ok(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(image)
                .arg(&overlay),
        )?;
        let vars = dir.join("vars.fd");
        std::fs::copy(FIRMWARE_VARS, &vars)?;
        let (http_port, ssh_port) = (free_port()?, free_port()?);
        let (accel, why) = accelerator();
        let started = Instant::now();
        let qemu = Command::new("qemu-system-x86_64")
            .args(&accel)
            .args(["-m", "1024", "-smp", "2", "-display", "none", "-no-reboot"])
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,readonly=on,file={FIRMWARE_CODE}"))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw", seed_img.display()))
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{http_port}-:{GUEST_HTTP},hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log"))?)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        Ok(Self {
            dir,
            qemu,
            key,
            http: SocketAddr::from(([127, 0, 0, 1], http_port)),
            ssh_port,
            started,
            accel: why,
        })
    }

    fn ssh_command(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-i").arg(&self.key).args([
            "-p",
            &self.ssh_port.to_string(),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=5",
            "root@127.0.0.1",
        ]);
        cmd
    }

    /// Runs a shell command in the VM as root; its stdout, or an error with both streams.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = self
            .ssh_command()
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .context("starting ssh")?;
        if !out.status.success() {
            bail!(
                "in the VM, `{script}` failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Copies a host file into the VM.
    pub fn copy_in(&self, local: &Path, remote: &str) -> anyhow::Result<()> {
        let data = std::fs::read(local).with_context(|| format!("reading {}", local.display()))?;
        let mut child = self
            .ssh_command()
            .arg(format!("cat > {remote}"))
            .stdin(Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(&mut child.stdin.take().context("piped stdin")?, &data)?;
        let status = child.wait()?;
        if !status.success() {
            bail!(
                "copying {} into the VM at {remote} failed ({status})",
                local.display()
            );
        }
        Ok(())
    }

    /// Waits until SSH answers, or fails with the end of the console log.
    pub fn wait_ssh(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.sh("true").is_ok() {
                return Ok(());
            }
            if let Some(status) = self.qemu.try_wait()? {
                bail!("qemu exited ({status}): {}", self.logs());
            }
            if Instant::now() > deadline {
                bail!("the VM's SSH did not answer within {limit:?}: {}", self.logs());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The tail of qemu's own log and of the serial console.
    pub fn logs(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let start = text.len().saturating_sub(3000);
            text.get(start..).unwrap_or_default().to_owned()
        };
        format!("qemu: {}\nconsole: {}", tail("qemu.log"), tail("console.log"))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
