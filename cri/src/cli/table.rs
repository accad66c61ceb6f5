//! Aligned columns for people (`docker ps` style).

/// Lays `rows` out under `headers`, each column as wide as its widest cell
/// (in characters), three spaces apart; the last column is not padded.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(widths.len()) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(widths.len()) {
            line.push_str(cell);
            if i + 1 < widths.len() {
                let pad = widths[i] - cell.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A command line as one cell: quoted where an argument has spaces, cut
/// to `max` characters.
pub fn command_cell(args: &[String], max: usize) -> String {
    let text = args
        .iter()
        .map(|a| {
            if a.contains(char::is_whitespace) || a.is_empty() {
                format!("{a:?}")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    if text.chars().count() <= max {
        return text;
    }
    let cut: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_their_widest_cell() {
        let rows = vec![
            vec!["a1".into(), "busybox".into(), "x".into()],
            vec!["b2".into(), "é".into(), "".into()],
        ];
        assert_eq!(
            render(&["ID", "IMAGE", "NAME"], &rows),
            "ID   IMAGE     NAME\na1   busybox   x\nb2   é\n"
        );
        assert_eq!(render(&["ID"], &[]), "ID\n");
    }

    #[test]
    fn commands_are_quoted_and_cut() {
        let args: Vec<String> = ["sh", "-c", "echo hi"].map(String::from).to_vec();
        assert_eq!(command_cell(&args, 40), "sh -c \"echo hi\"");
        assert_eq!(command_cell(&args, 6), "sh -c…");
    }
}
