//! `ftvm model` as a user runs it: every subcommand answers, in text and in JSON, and every
//! kind of bad input gets a one-line error that names the problem and a non-zero exit.

mod common;
use common::Scratch;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn ftvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ftvm")).args(args).output().expect("the ftvm binary runs")
}

fn stdout_of(args: &[&str]) -> String {
    let out = ftvm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ftvm {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn json_of(args: &[&str]) -> Value {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    serde_json::from_str(&stdout_of(&with_json)).expect("valid JSON")
}

/// Fails with a non-zero exit, no panic, and an error line naming the problem. Errors found
/// by ftvm are exactly one line; argument errors found by clap add its usual `--help` hint.
fn assert_fails(args: &[&str], needle: &str) {
    let out = ftvm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ftvm {args:?} succeeded");
    assert!(!stderr.contains("panicked"), "ftvm {args:?} panicked: {stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.contains("error") && first.contains(needle), "ftvm {args:?}: {first:?} lacks {needle:?}");
    let other_lines: Vec<&str> = stderr.lines().skip(1).filter(|l| !l.trim().is_empty()).collect();
    assert!(
        other_lines.is_empty() || other_lines == ["For more information, try '--help'."],
        "ftvm {args:?} printed more than one error line: {stderr}"
    );
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../reliability/examples").join(name).display().to_string()
}

fn scratch(name: &str) -> Scratch {
    common::scratch("model-cli", name)
}

fn number(v: &Value, path: &[&str]) -> f64 {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_f64().unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

#[test]
fn help_explains_every_model() {
    let help = stdout_of(&["model", "--help"]);
    for word in [
        "nv",
        "parallel",
        "move",
        "vote",
        "eval",
        "availability",
        "bound",
        "plot",
        "R_H·R_M",
        "C(n,i)",
        "MTTF",
        "1/(3R_M − 2R_M²)",
    ] {
        assert!(help.contains(word), "help lacks {word:?}");
    }
}

#[test]
fn nv_multiplies() {
    let v = json_of(&["model", "nv", "--rh", "0.99", "--rm", "0.9"]);
    assert!((number(&v, &["node", "reliability"]) - 0.891).abs() < 1e-15);
    assert!(stdout_of(&["model", "nv", "--rh", "0.99", "--rm", "0.9"]).contains("R   = 0.891"));
}

#[test]
fn parallel_answers_and_compares() {
    let args = ["model", "parallel", "--rh", "0.999", "--rv", "0.9999", "--rm", "0.9", "--n", "3"];
    let text = stdout_of(&args);
    assert!(text.contains("R   = 0.997901") && text.contains("more reliable"), "{text}");
    let v = json_of(&args);
    assert_eq!(v["better_than_non_virtualized"], Value::Bool(true));
    assert!((number(&v, &["min_rv", "min", "reliability"]) - 0.9 / 0.999).abs() < 1e-12);
}

#[test]
fn parallel_with_one_rm_per_vm() {
    let v = json_of(&["model", "parallel", "--rh", "1", "--rv", "1", "--rm", "0.9,0.8"]);
    assert!((number(&v, &["node", "unreliability"]) - 0.02).abs() < 1e-15);
}

#[test]
fn parallel_reports_tiny_unreliability() {
    let v = json_of(&["model", "parallel", "--rh", "1", "--rv", "1", "--rm", "0.9", "--n", "400"]);
    assert!((number(&v, &["node", "log10_unreliability"]) + 400.0).abs() < 1e-9, "{v}");
    let text = stdout_of(&["model", "parallel", "--rh", "1-1e-12", "--rv", "1", "--rm", "0.5", "--n", "80"]);
    assert!(text.contains("1-R = 1.000e-12"), "{text}");
}

#[test]
fn move_compares_placements() {
    let args = [
        "model",
        "move",
        "--rh",
        "1",
        "--rv",
        "1",
        "--n",
        "2",
        "--rf-guest",
        "0.9",
        "--rm-rest",
        "0.9",
        "--rf-monitor",
        "0.99",
    ];
    let v = json_of(&args);
    assert!((number(&v, &["in_guest", "reliability"]) - (1.0 - 0.19f64 * 0.19)).abs() < 1e-15);
    assert!((number(&v, &["in_monitor", "reliability"]) - 0.99 * 0.99).abs() < 1e-15);
    assert!(stdout_of(&args).contains("f belongs in the monitor"));
}

#[test]
fn vote_defaults_to_two_of_three() {
    let v = json_of(&["model", "vote", "--rh", "1", "--rv", "1", "--rm", "0.9"]);
    assert_eq!(v["inputs"]["k"], 2);
    assert!((number(&v, &["node", "reliability"]) - 0.972).abs() < 1e-15);
}

#[test]
fn eval_expression_with_blocks() {
    let v = json_of(&["model", "eval", "H * V * kofn(2, M[3])", "-b", "H=1", "--block", "V=1", "--block", "M=0.9"]);
    assert!((number(&v, &["node", "reliability"]) - 0.972).abs() < 1e-15);
}

#[test]
fn eval_toml_file_and_override() {
    let file = example("move-f.toml");
    let v = json_of(&["model", "eval", "--file", &file]);
    let want = 0.999 * (1.0 - 1e-4) * (1.0 - (1.0 - 0.95f64 * 0.9).powi(3));
    assert!((number(&v, &["node", "reliability"]) - want).abs() < 1e-15);
    let moved = json_of(&["model", "eval", "--file", &file, "H * V * F * parallel(rest[3])"]);
    assert!(number(&moved, &["node", "reliability"]) > want);
    let overridden = json_of(&["model", "eval", "--file", &file, "--block", "f=1"]);
    assert!(number(&overridden, &["node", "reliability"]) > want);
}

#[test]
fn eval_json_file() {
    let v = json_of(&["model", "eval", "--file", &example("tmr-node.json")]);
    let (a, b, c) = (0.9, 0.95, 1.0 - 1e-3);
    let vote = a * b + a * c + b * c - 2.0 * a * b * c;
    assert!((number(&v, &["node", "reliability"]) - 0.999 * 0.9999 * vote).abs() < 1e-15);
}

#[test]
fn availability_from_flags() {
    let args = [
        "model",
        "availability",
        "--mttf",
        "10000h",
        "--coverage",
        "0.99",
        "--recovery-time",
        "1s",
        "--repair-time",
        "4h",
    ];
    let v = json_of(&args);
    let d = 0.99 + 0.01 * 4.0 * 3600.0;
    assert!((number(&v, &["result", "unavailability"]) - d / (3.6e7 + d)).abs() < 1e-18);
    assert!(stdout_of(&args).contains("downtime per year"));
}

#[test]
fn availability_from_a_results_file() {
    let args = [
        "model",
        "availability",
        "--failure-rate",
        "1e-4/h",
        "--results",
        &example("campaign.json"),
        "--repair-time",
        "4h",
    ];
    let v = json_of(&args);
    assert_eq!(number(&v, &["measured", "coverage"]), 0.97);
    assert_eq!(number(&v, &["inputs", "recovery_time_s"]), 0.8);
    let pessimistic = number(&v, &["at_coverage_lower_bound", "unavailability"]);
    assert!(pessimistic > number(&v, &["result", "unavailability"]));
    assert!(stdout_of(&args).contains("95% lower confidence bound"));
}

#[test]
fn bound_rv_n_equal_one_never_helps() {
    let text = stdout_of(&["model", "bound", "rv", "--rm", "0.9", "--n", "1"]);
    assert!(text.contains("only if R_V > 1, i.e. never"), "{text}");
    let v = json_of(&["model", "bound", "rv", "--rm", "0.9", "--n", "2"]);
    assert!((number(&v, &["min_rv", "min", "reliability"]) - 0.9 / 0.99).abs() < 1e-15);
}

#[test]
fn bound_rv_vote_below_one_half() {
    assert!(stdout_of(&["model", "bound", "rv-vote", "--rm", "0.5"]).contains("only if R_V > 1, i.e. never"));
    let v = json_of(&["model", "bound", "rv-vote", "--rm", "0.9", "--n", "3", "--k", "2"]);
    assert!((number(&v, &["min_rv", "min", "reliability"]) - 1.0 / (2.7 - 1.62)).abs() < 1e-14);
}

#[test]
fn bound_rf() {
    let v = json_of(&["model", "bound", "rf", "--rf-guest", "0.95", "--rm-rest", "0.9", "--n", "3"]);
    let want = (1.0 - (1.0 - 0.855f64).powi(3)) / (1.0 - 0.1f64.powi(3));
    assert!((number(&v, &["min_rf", "min", "reliability"]) - want).abs() < 1e-15);
}

#[test]
fn bound_n_is_tight_and_knows_impossible() {
    let text =
        stdout_of(&["model", "bound", "n", "--rh", "0.9999", "--rv", "0.99999", "--rm", "0.9", "--target", "0.9995"]);
    assert!(text.contains("n = 4 VMs reach") && text.contains("n = 3 falls short"), "{text}");
    let v = json_of(&["model", "bound", "n", "--rh", "0.999", "--rv", "0.999", "--rm", "0.9", "--target", "0.999"]);
    assert_eq!(v["min_n"]["kind"], "unreachable");
}

#[test]
fn plots_write_svg_with_axes_and_legend() {
    let cases: [(&str, &[&str], &[&str]); 3] = [
        ("rv.svg", &["rv", "--n", "1,2,3"], &["least R_V", "n = 1 (never helps)", "n = 3"]),
        (
            "n.svg",
            &["n", "--rh", "0.99999", "--rv", "0.999999", "--target", "0.999,0.9999"],
            &["least n", "R = 0.9999"],
        ),
        ("vote.svg", &["vote", "--vote", "2/3,3/5"], &["least R_V", "2-of-3 voting", "3-of-5 voting"]),
    ];
    for (file, args, texts) in cases {
        let out = scratch(file);
        let out_text = out.display().to_string();
        let mut full = vec!["model", "plot"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--out", &out_text, "--points", "60"]);
        assert!(stdout_of(&full).starts_with("wrote "));
        let svg = std::fs::read_to_string(&out).expect("the SVG was written");
        assert!(svg.starts_with("<svg") && svg.contains("R_M (reliability of one VM"), "{file}");
        for text in texts {
            assert!(svg.contains(text), "{file} lacks {text:?}");
        }
    }
}

#[test]
fn probability_outside_the_unit_interval() {
    assert_fails(&["model", "nv", "--rh", "1.5", "--rm", "0.9"], "probability 1.5 is outside [0, 1]");
    assert_fails(&["model", "parallel", "--rh", "0.9", "--rv", "-0.1", "--rm", "0.9", "--n", "2"], "outside [0, 1]");
    assert_fails(&["model", "bound", "rv", "--rm", "abc", "--n", "2"], "`abc` is not a probability");
}

#[test]
fn zero_vms() {
    assert_fails(
        &["model", "parallel", "--rh", "1", "--rv", "1", "--rm", "0.9", "--n", "0"],
        "'--n <N>': must be at least 1",
    );
    assert_fails(&["model", "bound", "rv", "--rm", "0.9", "--n", "0"], "must be at least 1");
    assert_fails(&["model", "parallel", "--rh", "1", "--rv", "1", "--rm", "0.9"], "--n (the number of VMs) is needed");
}

#[test]
fn malformed_expression() {
    assert_fails(
        &["model", "eval", "H * (V", "-b", "H=1", "-b", "V=1"],
        "malformed expression at column 7: expected `)`",
    );
    assert_fails(&["model", "eval", "H + V"], "malformed expression at column 3: unexpected character `+`");
    assert_fails(&["model", "eval", "kofn(4, M[3])", "-b", "M=0.9"], "k-of-n needs 1 <= k <= n, got k = 4, n = 3");
}

#[test]
fn a_bad_block_value_names_the_block_and_the_problem_once() {
    let out = ftvm(&["model", "eval", "M", "-b", "M=1.5"]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "ftvm: error: block `M`: probability 1.5 is outside [0, 1]\n");
    assert!(!out.status.success());
}

#[test]
fn unknown_block_name() {
    assert_fails(&["model", "eval", "H * X", "-b", "H=0.9"], "unknown block `X` (defined: H)");
    assert_fails(&["model", "eval", "--file", &example("move-f.toml"), "H * nope"], "unknown block `nope`");
}

#[test]
fn bad_model_and_results_files() {
    let cyclic = scratch("cyclic.toml");
    std::fs::write(&cyclic, "system = \"a\"\n[blocks]\na = \"b\"\nb = \"a * 0.9\"\n").expect("write");
    assert_fails(&["model", "eval", "--file", &cyclic.display().to_string()], "cycle: a -> b -> a");
    let broken = scratch("broken.toml");
    std::fs::write(&broken, "[blocks]\nM = \n").expect("write");
    assert_fails(&["model", "eval", "--file", &broken.display().to_string()], "broken.toml at line 2");
    assert_fails(&["model", "eval", "--file", "/nonexistent/model.toml"], "cannot read /nonexistent/model.toml");
    let results = scratch("bad-results.json");
    std::fs::write(&results, r#"{"injected": 10, "recovered": 12}"#).expect("write");
    let path = results.display().to_string();
    assert_fails(
        &["model", "availability", "--mttf", "1y", "--results", &path],
        "`recovered` (12) exceeds `injected` (10)",
    );
}

#[test]
fn bad_availability_inputs() {
    assert_fails(
        &["model", "availability", "--mttf", "100", "--coverage", "1", "--recovery-time", "1s"],
        "`100` is not a duration",
    );
    assert_fails(
        &["model", "availability", "--mttf", "100h", "--coverage", "0.9", "--recovery-time", "1s"],
        "give their repair time",
    );
    assert_fails(&["model", "availability", "--mttf", "100h", "--recovery-time", "1s"], "no coverage");
    assert_fails(
        &["model", "availability", "--failure-rate", "3", "--coverage", "1", "--recovery-time", "1s"],
        "not a failure rate",
    );
}

#[test]
fn bad_plot_inputs() {
    assert_fails(&["model", "plot", "rv"], "--out FILE.svg is needed");
    let out = scratch("never.svg").display().to_string();
    assert_fails(&["model", "plot", "vote", "--vote", "4/3", "--out", &out], "k must not exceed n");
    assert_fails(&["model", "plot", "rv", "--rm-min", "0.9", "--rm-max", "0.5", "--out", &out], "needs min < max");
    assert_fails(&["model", "plot", "rv", "--out", "/nonexistent/dir/x.svg"], "cannot write /nonexistent/dir/x.svg");
}
