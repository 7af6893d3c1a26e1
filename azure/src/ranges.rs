//! Page ranges: the written parts of a page blob, as Get Page Ranges reports them.
//!
//! The answer is XML (`<PageList><PageRange><Start>0</Start><End>511</End></PageRange>…
//! <NextMarker>…</NextMarker></PageList>`, `End` inclusive). Parsed ranges are checked
//! (512-byte aligned, inside the asked window), then sorted and merged into half-open runs.

/// Sorted, non-overlapping, non-adjacent half-open byte ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRanges(pub Vec<(u64, u64)>);

impl PageRanges {
    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// Adds ranges and restores the invariants (sorted, merged).
    pub fn extend(&mut self, more: impl IntoIterator<Item = (u64, u64)>) {
        self.0.extend(more);
        self.0.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.0.len());
        for &(s, e) in &self.0 {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.0 = merged;
    }
}

/// True if `[off, off + len)` lies wholly inside the ranges.
pub fn covered(r: &PageRanges, off: u64, len: u64) -> bool {
    let i = r.0.partition_point(|&(_, e)| e <= off);
    r.0.get(i).is_some_and(|&(s, e)| s <= off && off + len <= e)
}

/// One page of a Get Page Ranges answer: the ranges, and the marker of the next page.
pub(crate) struct ParsedPage {
    pub ranges: Vec<(u64, u64)>,
    pub next_marker: Option<String>,
}

/// Parses one answer, checking every range against the window `[lo, hi)` asked for.
pub(crate) fn parse(xml: &str, lo: u64, hi: u64) -> Result<ParsedPage, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("page list XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "PageList" {
        return Err(format!(
            "expected a PageList element, got {}",
            root.tag_name().name()
        ));
    }
    let mut ranges = Vec::new();
    let mut next_marker = None;
    for n in root.children().filter(|n| n.is_element()) {
        match n.tag_name().name() {
            "PageRange" => {
                let field = |name: &str| -> Result<u64, String> {
                    let t = n
                        .children()
                        .find(|c| c.has_tag_name(name))
                        .and_then(|c| c.text())
                        .ok_or_else(|| format!("PageRange without {name}"))?;
                    t.trim()
                        .parse::<u64>()
                        .map_err(|_| format!("PageRange {name} {t:?} is not a number"))
                };
                let (start, end) = (field("Start")?, field("End")?);
                if start % 512 != 0 || end % 512 != 511 || end < start {
                    return Err(format!(
                        "page range {start}-{end} is not whole 512-byte pages"
                    ));
                }
                // A range may start before the window (the service reports whole ranges);
                // clip it, but it must meet the window.
                let (s, e) = (start.max(lo), (end + 1).min(hi));
                if s >= e {
                    return Err(format!(
                        "page range {start}-{end} lies outside the range {lo}-{hi} asked for"
                    ));
                }
                ranges.push((s, e));
            }
            "NextMarker" => {
                next_marker = n.text().map(str::to_string).filter(|t| !t.is_empty());
            }
            _ => {}
        }
    }
    Ok(ParsedPage {
        ranges,
        next_marker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_merge_and_answer_coverage() {
        let xml = "<?xml version=\"1.0\"?><PageList><PageRange><Start>4096</Start><End>8191</End>\
                   </PageRange><PageRange><Start>0</Start><End>511</End></PageRange>\
                   <PageRange><Start>512</Start><End>1023</End></PageRange><NextMarker/></PageList>";
        let p = parse(xml, 0, 1 << 20).unwrap();
        assert!(p.next_marker.is_none());
        let mut r = PageRanges::default();
        r.extend(p.ranges);
        assert_eq!(r.0, vec![(0, 1024), (4096, 8192)]);
        assert_eq!(r.bytes(), 1024 + 4096);
        assert!(covered(&r, 0, 1024));
        assert!(covered(&r, 4096, 512));
        assert!(!covered(&r, 512, 1024));
        assert!(!covered(&r, 2048, 512));
        assert!(!covered(&r, 8192, 1));
    }

    #[test]
    fn hostile_page_lists_are_refused() {
        for (xml, what) in [
            ("garbage", "XML"),
            ("<Other/>", "PageList"),
            ("<PageList><PageRange><Start>1</Start><End>511</End></PageRange></PageList>", "512"),
            ("<PageList><PageRange><Start>0</Start></PageRange></PageList>", "without End"),
            ("<PageList><PageRange><Start>x</Start><End>511</End></PageRange></PageList>", "number"),
            (
                "<PageList><PageRange><Start>1048576</Start><End>2097151</End></PageRange></PageList>",
                "outside",
            ),
        ] {
            let e = parse(xml, 0, 1 << 20).err().expect(xml);
            assert!(e.contains(what), "{xml}: {e}");
        }
    }
}
