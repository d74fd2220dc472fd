//! A scrape of a proxy's `/metrics`, parsed from the Prometheus text format.

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
}
