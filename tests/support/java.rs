// Java programs against pgjdbc for driver-compatibility tests: the driver is Debian's
// libpostgresql-jdbc-java, the compiler the JDK's javac; the test writes the source.

use super::scratch_dir;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Where Debian's libpostgresql-jdbc-java puts pgjdbc.
pub const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Compiles `source` (a public class `class_name`) against pgjdbc and runs it with `args`.
/// Panics with what to install when the JDK or the driver is missing: a silently skipped
/// driver test would report a compatibility it never checked.
pub fn run_java(class_name: &str, source: &str, args: &[&str]) -> Output {
    super::require_program("javac", "apt-get install default-jdk-headless");
    super::require_program("java", "apt-get install default-jdk-headless");
    assert!(
        Path::new(PGJDBC_JAR).exists(),
        "{PGJDBC_JAR} is missing: apt-get install libpostgresql-jdbc-java (.ci/run installs it)"
    );
    let dir = scratch_dir("java");
    std::fs::write(dir.join(format!("{class_name}.java")), source).expect("write java source");
    let javac = Command::new("javac")
        .args(["-cp", PGJDBC_JAR, "-d"])
        .arg(&dir)
        .arg(dir.join(format!("{class_name}.java")))
        .stdin(Stdio::null())
        .output()
        .expect("run javac");
    super::postgres::check(&javac, "javac");
    let classpath = format!("{PGJDBC_JAR}:{}", dir.display());
    let out = Command::new("java")
        // A short-lived program: the serial collector and the first JIT tier start fastest.
        .args(["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", &classpath, class_name])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run java");
    let _ = std::fs::remove_dir_all(&dir);
    out
}
