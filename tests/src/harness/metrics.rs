//! A scrape of a proxy's `/metrics`, parsed from the Prometheus text format; and a check of that
//! text with Prometheus' own Python parser, which is stricter than ours.

#[derive(Debug, Clone)]
pub struct Scrape {
    samples: Vec<Sample>,
    pub text: String,
}

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Self {
            samples,
            text: text.to_string(),
        }
    }

    /// The sum of every series of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.value)
            .sum::<f64>()
            + 0.0 // an empty f64 sum is -0.0, which would print as "-0"
    }

    /// The label sets of every series of `name`, in the order they were scraped.
    pub fn series(&self, name: &str) -> Vec<Vec<(String, String)>> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.labels.clone())
            .collect()
    }
}

/// Parses `text` with `prometheus_client.parser.text_string_to_metric_families` (the Python
/// client's parser, `pip install prometheus-client`): the number of samples, or the parser's
/// error. The text goes through stdin, so a large scrape is no problem.
pub fn check_with_prometheus_parser(text: &str) -> Result<usize, String> {
    use std::io::Write;
    const SCRIPT: &str = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        print(sum(len(f.samples) for f in text_string_to_metric_families(sys.stdin.read())))\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("python3 has no stdin")?;
    let text = text.to_string();
    // Written from a thread: a parser that fails early stops reading, and must not block us.
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("python3: {e}"))?;
    let _ = writer.join();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("No module named 'prometheus_client'") {
            return Err("python3 lacks prometheus_client: pip install prometheus-client".into());
        }
        // The exception is the last line of the traceback.
        let error = stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(format!(
            "the Prometheus parser refused the text: {}",
            error.unwrap_or("?")
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .trim()
        .parse()
        .map_err(|_| format!("unexpected parser output: {stdout}{stderr}"))
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => {
            let body = rest.strip_suffix('}')?;
            let labels = body
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.trim().to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            (name.to_string(), labels)
        }
        None => (series.to_string(), Vec::new()),
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_series() {
        let s = Scrape::parse(
            "# HELP x\ntrellis_requests_total{direction=\"outbound\",protocol=\"http1\",status=\"200\"} 3\n\
             trellis_requests_total{direction=\"outbound\",protocol=\"http2\",status=\"200\"} 2\n\
             trellis_requests_total{direction=\"inbound\",protocol=\"http1\",status=\"200\"} 7\n",
        );
        assert_eq!(
            s.sum("trellis_requests_total", &[("direction", "outbound")]),
            5.0
        );
        assert_eq!(
            s.sum("trellis_requests_total", &[("protocol", "http1")]),
            10.0
        );
        assert_eq!(s.sum("trellis_requests_total", &[("status", "500")]), 0.0);
    }

    #[test]
    fn the_prometheus_parser_counts_samples_and_names_its_error() {
        let good = "# HELP x_total Things.\n# TYPE x_total counter\n\
                    x_total{a=\"1\"} 3\nx_total{a=\"2\"} 4\n";
        match check_with_prometheus_parser(good) {
            Err(e)
                if e.contains("lacks prometheus_client")
                    && !std::env::var("CI").is_ok_and(|v| v == "true") =>
            {
                eprintln!("SKIPPED: {e}");
                return;
            }
            got => assert_eq!(got, Ok(2)),
        }
        let bad = "x_total{a=\"1\" 3\n";
        let err = check_with_prometheus_parser(bad).unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }
}
