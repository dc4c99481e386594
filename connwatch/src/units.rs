//! Values as people type them on the command line: durations (`500ms`, `10s`, `2m`, or
//! a bare number of seconds) and percentages.
use std::time::Duration;

/// A duration: `500ms`, `10s`, `2m`, `1h30m`; a bare number is seconds (`2`, `0.5`), as
/// `vmstat 2` and `iostat 2` have it.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Some(rest) = s.trim().strip_prefix('-')
        && rest.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(format!(
            "`{s}` is negative: a duration is a positive number with a unit, e.g. 500ms, 10s, 2m"
        ));
    }
    let bare = s.trim();
    let d = if !bare.is_empty() && bare.chars().all(|c| c.is_ascii_digit() || c == '.') {
        bare.parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| format!("`{s}` is not a number of seconds, e.g. 2 or 0.5"))?
    } else {
        humantime::parse_duration(bare)
            .map_err(|e| format!("{e}: use a number with a unit, e.g. 500ms, 10s, 2m"))?
    };
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// A report interval: between 100ms and 1h.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err("the interval must be between 100ms and 1h".into());
    }
    Ok(d)
}

pub fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage"))?;
    if !(v > 0.0 && v <= 100.0) {
        return Err("must be a percentage above 0 and at most 100".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        // A bare number is seconds.
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("1.2.3").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("-1s").unwrap_err().contains("negative"));
    }
}
