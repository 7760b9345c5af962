//! Whether buffers share memory: [`crate::run`] requires that no two do, and the bindings
//! check it for the whole of one call (every parameter, grad and state) before any write.
//! A buffer is a half-open byte range `(start, end)`; empty ranges share nothing.

/// Whether two non-empty ranges share a byte, given the ranges as lists each sorted by
/// start (the threads of one step each sort their own): one pass over their merge.
pub fn any_overlap_sorted(lists: &[Vec<(usize, usize)>]) -> bool {
    match lists {
        [] => false,
        [a] => overlap_in_sorted(a.iter().copied()),
        [a, b] => {
            let (mut a, mut b) = (a.iter().copied().peekable(), b.iter().copied().peekable());
            overlap_in_sorted(std::iter::from_fn(|| match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if y.0 < x.0 => b.next(),
                (Some(_), _) => a.next(),
                _ => b.next(),
            }))
        }
        _ => {
            // More threads than two: the sort finds the sorted runs.
            let mut all: Vec<(usize, usize)> = lists.iter().flatten().copied().collect();
            any_overlap(&mut all)
        }
    }
}

/// True when two of the non-empty `ranges` share a byte (sorts `ranges`).
pub fn any_overlap(ranges: &mut [(usize, usize)]) -> bool {
    // By start only: equal starts of non-empty ranges overlap whatever their order.
    ranges.sort_unstable_by_key(|r| r.0);
    overlap_in_sorted(ranges.iter().copied())
}

/// Whether two non-empty ranges of a list sorted by start share a byte.
fn overlap_in_sorted(sorted: impl Iterator<Item = (usize, usize)>) -> bool {
    let mut end = 0usize;
    for (s, e) in sorted {
        if s == e {
            continue;
        }
        if s < end {
            return true;
        }
        end = end.max(e);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touching_ranges_do_not_overlap() {
        assert!(!any_overlap(&mut [(10, 20), (0, 10), (20, 30)]));
        assert!(any_overlap(&mut [(10, 20), (0, 11)]));
    }

    #[test]
    fn empty_ranges_share_nothing() {
        assert!(!any_overlap(&mut [(5, 5), (0, 10)]));
        assert!(any_overlap(&mut [(5, 6), (0, 10)])); // contained
        assert!(any_overlap(&mut [(3, 9), (3, 4)])); // same start
    }

    #[test]
    fn a_range_contained_in_an_earlier_long_one() {
        // The third range overlaps the first, not its neighbour in the sorted order.
        assert!(any_overlap(&mut [(0, 100), (100, 100), (50, 60)]));
        assert!(any_overlap(&mut [(0, 100), (10, 20), (30, 40)]));
    }

    #[test]
    fn sorted_lists_are_checked_across_each_other() {
        let sorted = |v: &[(usize, usize)]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        let a = sorted(&[(0, 10), (100, 110), (200, 210)]);
        let b = sorted(&[(20, 30), (150, 160), (205, 206)]);
        let c = sorted(&[(40, 50)]);
        // Within each list nothing overlaps; (205, 206) lies inside (200, 210) of the other.
        for lists in [
            vec![a.clone(), b.clone()],
            vec![b.clone(), a.clone()],
            vec![a.clone(), c.clone(), b.clone()],
        ] {
            assert!(any_overlap_sorted(&lists));
        }
        let b2 = sorted(&[(20, 30), (150, 160), (210, 220)]);
        for lists in [
            vec![a.clone(), b2.clone()],
            vec![b2.clone(), a.clone()],
            vec![a.clone(), c.clone(), b2.clone()],
            vec![a.clone()],
            vec![],
        ] {
            assert!(!any_overlap_sorted(&lists));
        }
        // The first range of one list against the last of the other.
        assert!(any_overlap_sorted(&[
            vec![(0, 8), (50, 60)],
            vec![(10, 20), (55, 56)]
        ]));
        assert!(any_overlap_sorted(&[
            vec![(0, 1000)],
            vec![(10, 20), (990, 995)]
        ]));
    }

    #[test]
    fn matches_a_pairwise_check() {
        // Pseudo-random ranges, checked against every pair, split into two sorted lists.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % m) as usize
        };
        for _ in 0..2000 {
            let n = 1 + next(12);
            let ranges: Vec<(usize, usize)> = (0..n)
                .map(|_| {
                    let s = next(400);
                    (s, s + next(40))
                })
                .collect();
            let pairwise = (0..n).any(|i| {
                (0..i).any(|j| {
                    let (a, b) = (ranges[i], ranges[j]);
                    a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1
                })
            });
            assert_eq!(any_overlap(&mut ranges.clone()), pairwise, "{ranges:?}");
            let cut = next(n as u64 + 1);
            let (mut a, mut b) = (ranges[..cut].to_vec(), ranges[cut..].to_vec());
            a.sort();
            b.sort();
            assert_eq!(
                any_overlap_sorted(&[a, b]),
                pairwise,
                "{ranges:?} cut at {cut}"
            );
        }
    }
}
