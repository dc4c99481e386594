//! Reading an iterator's output (the file of a pass) in whole records, a batch at a
//! time: read whole, the output of a namespace with 50,000 sockets is ~5 MB of
//! buffer, ~1,300 pages touched for the first time at every start (~5 µs each on a VM)
//! only to be parsed once and freed.
use std::io::{self, Read};

/// Records read at most at once.
const BATCH: usize = 512;

/// Hands `each` the output of `file` as batches of whole `size`-byte records, in order.
/// The kernel may end a read within a record: its start is kept for the next batch. An
/// output that ends within a record is an error.
pub fn for_each_batch(
    mut file: impl Read,
    size: usize,
    mut each: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; size * BATCH];
    let mut filled = 0;
    loop {
        let n = match file.read(buf.get_mut(filled..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        filled += n;
        let whole = filled - filled % size;
        if whole > 0 {
            each(buf.get(..whole).unwrap_or_default())?;
            buf.copy_within(whole..filled, 0);
            filled -= whole;
        }
    }
    if filled != 0 {
        return Err(io::Error::other(format!(
            "the iterator's output ends within a record ({filled} of {size} bytes)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that returns at most `step` bytes a read, and is interrupted once.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        interrupted: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn batches(data: &[u8], size: usize, step: usize) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let file = Trickle {
            data,
            step,
            interrupted: false,
        };
        for_each_batch(file, size, |b| {
            assert_eq!(b.len() % size, 0, "a batch of whole records");
            out.push(b.to_vec());
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn records_split_across_reads_come_whole_and_in_order() {
        let data: Vec<u8> = (0..=255u8).cycle().take(7 * 2000).collect();
        for step in [1, 5, 7, 13, 7 * BATCH, 100_000] {
            let got = batches(&data, 7, step).unwrap();
            assert_eq!(got.concat(), data, "step {step}");
        }
        assert!(batches(&[], 7, 3).unwrap().is_empty());
    }

    #[test]
    fn a_torn_last_record_is_an_error() {
        assert!(batches(&[1, 2, 3, 4, 5, 6, 7, 8], 7, 3).is_err());
    }
}
