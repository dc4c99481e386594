//! Compact numbers for people: ages, rates, times to exhaustion, plurals (the flags'
//! sentences and the views share them).

pub fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A rate with one decimal below 10, none above.
pub fn fmt_rate(g: f64) -> String {
    if g >= 10.0 {
        format!("{g:.0}")
    } else {
        format!("{g:.1}")
    }
}

/// Time until something runs out: `40 s`, `96 min`, `3.5 h`.
pub fn fmt_eta(secs: f64) -> String {
    let min = secs / 60.0;
    if min < 1.0 {
        format!("{secs:.0} s")
    } else if min < 120.0 {
        format!("{min:.0} min")
    } else {
        format!("{:.1} h", min / 60.0)
    }
}

/// Compact age: `850ms`, `42s`, `5m12s`, `3h04m`, `2d05h`.
pub fn fmt_age(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 1.0 {
        return format!("{:.0}ms", s * 1000.0);
    }
    if s < 10.0 {
        return format!("{s:.1}s");
    }
    let t = s as u64;
    match t {
        0..60 => format!("{t}s"),
        60..3600 => format!("{}m{:02}s", t / 60, t % 60),
        3600..86400 => format!("{}h{:02}m", t / 3600, (t % 3600) / 60),
        _ => format!("{}d{:02}h", t / 86400, (t % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_compact() {
        assert_eq!(fmt_age(0.25), "250ms");
        assert_eq!(fmt_age(4.5), "4.5s");
        assert_eq!(fmt_age(42.0), "42s");
        assert_eq!(fmt_age(312.0), "5m12s");
        assert_eq!(fmt_age(11_040.0), "3h04m");
        assert_eq!(fmt_age(190_800.0), "2d05h");
    }

    #[test]
    fn rates_and_etas() {
        assert_eq!(fmt_rate(2.04), "2.0");
        assert_eq!(fmt_rate(12.6), "13");
        assert_eq!(fmt_eta(40.0), "40 s");
        assert_eq!(fmt_eta(5760.0), "96 min");
        assert_eq!(fmt_eta(12_600.0), "3.5 h");
        assert_eq!(plural(1), "");
        assert_eq!(plural(2), "s");
    }
}
