//! The retention set: what the run must not destroy.
//!
//! * **Texts** whose loss, before and after training, shows how much general language modelling the
//!   run cost (a positive delta = forgetting).
//! * **Questions** the base model answers greedily before the first update. A loss delta can stay
//!   small while a model answers every question in the task's format; the answer probe catches
//!   that. Two measures, both reported ([`RetentionScore`]):
//!   - *knowledge kept*: of the questions the base answered **correctly** (its answer contains one
//!     of the question's answer keys), the share the tuned model still answers correctly. This is
//!     the score (`retention.score`, `minScore`) whenever the set has answer keys and the base got
//!     at least one right: it asks whether the model can still do what it could, not whether it
//!     words it the same way, and a base answer that was wrong cannot be "lost".
//!   - *verbatim kept*: the share of answers identical to the base's after normalisation. It is
//!     the score when there are no keys, and then strict: a correct answer that got shorter counts
//!     as changed. With keys, answers end where they became correct ([`settled_correct`]: the
//!     score would not change, and a model that still answers in sentences no longer pays for the
//!     rest of each one), so verbatim then compares answers up to their key.
//!
//! Both come built in; `evaluation.retention.data` replaces them with a JSON Lines file of
//! `{"prompt": "...", "answers": ["..."]}` (questions, keys optional) and `{"text": "..."}` lines.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::train::general::{self, Split};
use crate::train::probe::{self, normalize};

pub const BUILTIN_TEXTS: [&str; 20] = [
    "The capital of France is Paris, a city known for the Eiffel Tower and the Louvre museum.",
    "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees Celsius.",
    "The Earth orbits the Sun once every 365.25 days, which is why we have a leap year every four years.",
    "Photosynthesis is the process by which green plants use sunlight to turn carbon dioxide and water into sugar and oxygen.",
    "William Shakespeare wrote plays such as Hamlet, Macbeth and Romeo and Juliet.",
    "To make a cup of tea, boil water, pour it over a tea bag, wait a few minutes and remove the bag.",
    "The human heart has four chambers: two atria and two ventricles.",
    "A triangle has three sides, and the sum of its interior angles is 180 degrees.",
    "The Pacific Ocean is the largest and deepest ocean on Earth.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "Regular exercise, a balanced diet and enough sleep help people stay healthy.",
    "Python is a popular programming language known for its readable syntax.",
    "The Great Wall of China stretches for thousands of kilometres across northern China.",
    "Bees collect nectar from flowers and turn it into honey inside their hives.",
    "The speed of light in a vacuum is about 300,000 kilometres per second.",
    "Mount Everest, at 8,849 metres, is the highest mountain above sea level.",
    "A library lends books, magazines and films to the members of its community.",
    "Dear Sam, thank you for the lovely birthday gift. I hope we can meet again soon. Best wishes, Alex.",
    "The mitochondria are often called the powerhouse of the cell because they produce energy.",
    "If it rains tomorrow, we will move the picnic indoors and play board games instead.",
];

/// Questions for the answer probe and texts for the loss delta.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionSet {
    pub questions: Vec<String>,
    /// Per question, the words a correct answer contains (empty: no key for that question).
    pub answer_keys: Vec<Vec<String>>,
    pub texts: Vec<String>,
    /// Where it came from, for logs and the summary.
    pub source: String,
}

impl RetentionSet {
    /// The `probe` part of the general question set, and the built-in texts.
    pub fn builtin() -> Self {
        let mut set = Self::general(Split::Probe);
        set.texts = BUILTIN_TEXTS.iter().map(|t| t.to_string()).collect();
        set.source = "built-in".into();
        set
    }

    /// One part of the general question set ([`crate::train::general`]), without texts.
    pub fn general(part: Split) -> Self {
        let questions = general::split(part);
        RetentionSet {
            questions: questions.iter().map(|q| q.prompt.clone()).collect(),
            answer_keys: questions.iter().map(|q| q.answers.clone()).collect(),
            texts: Vec::new(),
            source: format!("general question set, {part:?} part").to_lowercase(),
        }
    }

    /// Reads a JSON Lines file of `{"prompt": ...}` and `{"text": ...}` lines (blank lines
    /// skipped); errors name the file and line.
    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let content = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut set = RetentionSet {
            questions: Vec::new(),
            answer_keys: Vec::new(),
            texts: Vec::new(),
            source: path.display().to_string(),
        };
        let bad = |line: usize, message: String| Error::Data {
            path: path.to_path_buf(),
            line,
            message,
        };
        for (i, raw) in content.lines().enumerate() {
            let line = i + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(raw).map_err(|e| bad(line, format!("invalid JSON: {e}")))?;
            let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            match (field("prompt"), field("text")) {
                (Some(p), _) if !p.trim().is_empty() => {
                    set.questions.push(p);
                    set.answer_keys
                        .push(answer_keys(&v).map_err(|m| bad(line, m))?);
                }
                (None, Some(t)) if !t.trim().is_empty() => set.texts.push(t),
                _ => {
                    return Err(bad(
                        line,
                        "expected a non-empty string field `prompt` (a question) or `text`".into(),
                    ));
                }
            }
        }
        if set.questions.is_empty() && set.texts.is_empty() {
            return Err(bad(0, "the retention set is empty".into()));
        }
        Ok(set)
    }
}

/// The optional `answers` field of a question line: non-empty strings.
fn answer_keys(line: &serde_json::Value) -> std::result::Result<Vec<String>, String> {
    let Some(answers) = line.get("answers") else {
        return Ok(Vec::new());
    };
    let bad = || "`answers` must be a list of non-empty strings (words a correct answer contains)";
    let list = answers.as_array().ok_or_else(|| bad().to_string())?;
    list.iter()
        .map(|a| match a.as_str() {
            Some(s) if !s.trim().is_empty() => Ok(s.to_string()),
            _ => Err(bad().to_string()),
        })
        .collect()
}

/// Whether `answer` contains one of `keys` as whole words. Keys in lower case match in any case;
/// a key with a capital letter must match exactly ("CAT" for "write cat in capitals", "Au" for
/// gold, which would otherwise match inside French words). Hyphens separate words, so "a 24-hour
/// period" answers "24" and "twenty-four" matches the key "twenty four".
pub fn answer_is_correct(answer: &str, keys: &[String]) -> bool {
    let words =
        |s: &str| -> Vec<String> { crate::text::word_runs(s).map(str::to_string).collect() };
    let answer_words = words(answer);
    let answer_lower: Vec<String> = answer_words.iter().map(|w| w.to_lowercase()).collect();
    keys.iter().any(|key| {
        let case_sensitive = key.chars().any(char::is_uppercase);
        let key_words = words(key);
        let haystack = if case_sensitive {
            &answer_words
        } else {
            &answer_lower
        };
        let needle: Vec<String> = if case_sensitive {
            key_words
        } else {
            key_words.iter().map(|w| w.to_lowercase()).collect()
        };
        !needle.is_empty()
            && haystack
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
    })
}

/// Whether an answer that begins with `partial` is correct however it goes on: its finished words
/// already hold a key ([`answer_is_correct`]). A word is finished once a character that is not
/// alphanumeric follows it; the word still being written is left out ("4" is not yet an answer
/// when "42" may follow), and so is a trailing U+FFFD, the half of a character whose other bytes
/// are still to come. Words are alphanumeric runs, so text appended later cannot change a finished
/// one: a settled answer stays correct, and the probe stops decoding it.
pub fn settled_correct(partial: &str, keys: &[String]) -> bool {
    let text = partial.trim_end_matches('\u{FFFD}');
    let finished = match text.char_indices().rfind(|(_, c)| !c.is_alphanumeric()) {
        Some((i, c)) => &text[..i + c.len_utf8()],
        None => return false,
    };
    !keys.is_empty() && answer_is_correct(finished, keys)
}

/// How much of the base model's behaviour on the probe questions survived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RetentionScore {
    pub questions: usize,
    /// Answers identical to the base's after trimming.
    pub verbatim_exact: usize,
    /// Answers identical to the base's after normalisation (case, spacing, final punctuation).
    pub verbatim: usize,
    /// Questions with answer keys that the base model answered correctly.
    pub base_correct: usize,
    /// Of those, the ones the tuned model still answers correctly.
    pub kept: usize,
    /// Questions the base got wrong and the tuned model gets right (reported, not scored).
    pub gained: usize,
}

/// Which measure [`RetentionScore::score`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreBasis {
    /// Knowledge kept: correct base answers still correct.
    AnswerKeys,
    /// Verbatim kept: no question has a key the base answered correctly.
    Verbatim,
}

impl RetentionScore {
    /// Scores `answers` against the base model's `base` answers and the questions' `keys`
    /// (`keys[i]` empty = no key for question i).
    pub fn measure(answers: &[String], base: &[String], keys: &[Vec<String>]) -> Self {
        // Verbatim agreement is the probe's own comparison, with the base answers as references.
        let verbatim = probe::score(answers, base);
        let mut s = RetentionScore {
            questions: verbatim.samples,
            verbatim_exact: verbatim.exact,
            verbatim: verbatim.normalized,
            ..Default::default()
        };
        for (i, (a, b)) in answers.iter().zip(base).enumerate() {
            let Some(k) = keys.get(i).filter(|k| !k.is_empty()) else {
                continue;
            };
            match (answer_is_correct(b, k), answer_is_correct(a, k)) {
                (true, true) => {
                    s.base_correct += 1;
                    s.kept += 1;
                }
                (true, false) => s.base_correct += 1,
                (false, true) => s.gained += 1,
                (false, false) => {}
            }
        }
        s
    }

    pub fn basis(&self) -> ScoreBasis {
        if self.base_correct > 0 {
            ScoreBasis::AnswerKeys
        } else {
            ScoreBasis::Verbatim
        }
    }

    /// The headline score in [0, 1]: knowledge kept, or verbatim kept without keys.
    pub fn score(&self) -> f64 {
        match self.basis() {
            ScoreBasis::AnswerKeys => self.kept as f64 / self.base_correct as f64,
            ScoreBasis::Verbatim => self.verbatim_share(),
        }
    }

    /// The 95 % Wilson score interval of [`RetentionScore::score`]: on ~30 questions one answer
    /// moves the score by 3–6 points, so a score without its interval invites over-reading.
    pub fn interval_95(&self) -> (f64, f64) {
        match self.basis() {
            ScoreBasis::AnswerKeys => wilson_95(self.kept, self.base_correct),
            ScoreBasis::Verbatim => wilson_95(self.verbatim, self.questions),
        }
    }

    /// Share of answers identical to the base's after normalisation.
    pub fn verbatim_share(&self) -> f64 {
        probe::ratio(self.verbatim, self.questions)
    }

    /// Share of answers identical to the base's after trimming.
    pub fn exact_share(&self) -> f64 {
        probe::ratio(self.verbatim_exact, self.questions)
    }

    /// "21/24 correct base answers kept" or "5/30 base answers kept verbatim".
    pub fn describe(&self) -> String {
        match self.basis() {
            ScoreBasis::AnswerKeys => format!(
                "{}/{} correct base answers kept, {}/{} verbatim",
                self.kept, self.base_correct, self.verbatim, self.questions
            ),
            ScoreBasis::Verbatim => format!(
                "{}/{} base answers kept verbatim",
                self.verbatim, self.questions
            ),
        }
    }
}

/// Changed answers, for a person to judge (a score says how many, not how): every answer whose
/// knowledge was lost (the base was right, the tuned model is not), then up to
/// [`MORE_CHANGED`] other answers that changed wording.
pub fn changed_answers(
    questions: &[String],
    base: &[String],
    answers: &[String],
    keys: &[Vec<String>],
) -> Vec<serde_json::Value> {
    let rows: Vec<(serde_json::Value, bool)> = questions
        .iter()
        .zip(base)
        .zip(answers)
        .enumerate()
        .filter(|(_, ((_, b), a))| normalize(a) != normalize(b))
        .map(|(i, ((q, b), a))| {
            let keys = keys.get(i).filter(|k| !k.is_empty());
            let base_correct = keys.map(|k| answer_is_correct(b, k));
            let tuned_correct = keys.map(|k| answer_is_correct(a, k));
            let lost = base_correct == Some(true) && tuned_correct == Some(false);
            let row = serde_json::json!({
                "question": q, "base": b, "tuned": a,
                "base_correct": base_correct, "tuned_correct": tuned_correct, "lost": lost,
            });
            (row, lost)
        })
        .collect();
    let lost = rows.iter().filter(|(_, l)| *l).map(|(r, _)| r.clone());
    let other = rows.iter().filter(|(_, l)| !*l).map(|(r, _)| r.clone());
    lost.chain(other.take(MORE_CHANGED)).collect()
}

/// The 95 % Wilson score interval of `k` successes in `n` trials ((0, 1) when `n` is 0).
pub fn wilson_95(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n, p) = (1.96_f64, n as f64, k as f64 / n as f64);
    let centre = p + z * z / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    let denominator = 1.0 + z * z / n;
    (
        ((centre - spread) / denominator).max(0.0),
        ((centre + spread) / denominator).min(1.0),
    )
}

/// Changed answers listed beyond the lost ones.
pub const MORE_CHANGED: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_settles_once_a_key_is_a_finished_word() {
        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let four = keys(&["4"]);
        assert!(!settled_correct("The answer is 4", &four), "42 may follow");
        assert!(settled_correct("The answer is 4.", &four));
        assert!(!settled_correct("The answer is 42.", &four));
        assert!(!settled_correct("4", &four), "nothing is finished yet");
        // Half a character is not yet a word boundary: "caf\u{FFFD}" may become "café".
        assert!(!settled_correct("a caf\u{FFFD}", &keys(&["caf"])));
        assert!(settled_correct("a caf \u{FFFD}", &keys(&["caf"])));
        // Keys of several words, and case, as answer_is_correct reads them.
        let city = keys(&["new york"]);
        assert!(!settled_correct("It is New York", &city));
        assert!(settled_correct("It is New York,", &city));
        assert!(!settled_correct("cat ", &keys(&["CAT"])));
        assert!(
            !settled_correct("Paris ", &[]),
            "no keys, nothing to settle"
        );
        // Settled stays settled: every longer text is correct too.
        let text = "Sure! 2 + 2 = 4, which is even.";
        let first = text
            .char_indices()
            .map(|(i, c)| &text[..i + c.len_utf8()])
            .position(|p| settled_correct(p, &four))
            .expect("settles");
        for (i, c) in text.char_indices().skip(first) {
            assert!(answer_is_correct(&text[..i + c.len_utf8()], &four));
        }
    }

    #[test]
    fn wilson_intervals_match_the_textbook_values() {
        // 16/17: (0.730, 0.990); 22/29: (0.579, 0.878); 0/10: (0, 0.278).
        let round = |(a, b): (f64, f64)| ((a * 1000.0).round(), (b * 1000.0).round());
        assert_eq!(round(wilson_95(16, 17)), (730.0, 990.0));
        assert_eq!(round(wilson_95(22, 29)), (579.0, 878.0));
        assert_eq!(round(wilson_95(0, 10)), (0.0, 278.0));
        assert_eq!(wilson_95(0, 0), (0.0, 1.0));
    }

    #[test]
    fn jsonl_set_splits_questions_and_texts_and_names_bad_lines() {
        let dir = std::env::temp_dir().join(format!("retention-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"2+2?\"}\n\n{\"text\": \"Snow is white.\"}\n",
        )
        .unwrap();
        let set = RetentionSet::from_jsonl(&p).unwrap();
        assert_eq!(set.questions, vec!["2+2?"]);
        assert_eq!(set.texts, vec!["Snow is white."]);
        std::fs::write(&p, "{\"prompt\": \"ok\"}\n{\"question\": \"no\"}\n").unwrap();
        let e = RetentionSet::from_jsonl(&p).unwrap_err().to_string();
        assert!(
            e.contains("r.jsonl") && e.contains(":2") && e.contains("prompt"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn answer_keys_match_whole_words_and_capitals_only_when_asked() {
        assert!(answer_is_correct(
            "The capital of France is Paris.",
            &keys(&["paris"])
        ));
        assert!(!answer_is_correct(
            "Parisian cafés are nice.",
            &keys(&["paris"])
        ));
        assert!(answer_is_correct("7 + 5 = 12.", &keys(&["12", "twelve"])));
        assert!(!answer_is_correct("It is 120.", &keys(&["12"])));
        assert!(answer_is_correct(
            "Plants absorb carbon  dioxide.",
            &keys(&["carbon dioxide"])
        ));
        assert!(answer_is_correct("Here it is: CAT", &keys(&["CAT"])));
        assert!(!answer_is_correct("Here it is: cat", &keys(&["CAT"])));
        assert!(!answer_is_correct("POSITIVE", &keys(&["cold"])));
        assert!(answer_is_correct(
            "twenty-four hours",
            &keys(&["twenty-four"])
        ));
        assert!(answer_is_correct(
            "twenty-four hours",
            &keys(&["twenty four"])
        ));
        assert!(answer_is_correct(
            "A day is a 24-hour period.",
            &keys(&["24"])
        ));
        assert!(!answer_is_correct("It is 240-odd.", &keys(&["24"])));
        assert!(!answer_is_correct("anything", &[]));
    }

    #[test]
    fn knowledge_kept_counts_only_questions_the_base_got_right() {
        let base = keys(&[
            "The capital of France is Paris.",
            "The largest planet is Neptune.",
            "The opposite of hot is cold. It is a basic concept.",
            "Bees make honey.",
        ]);
        let tuned = keys(&[
            "NEGATIVE",
            "The largest planet is Jupiter.",
            "The opposite of hot is cold.",
            "Bees make honey.",
        ]);
        let k = vec![
            keys(&["paris"]),
            keys(&["jupiter"]),
            keys(&["cold"]),
            keys(&["honey"]),
        ];
        let s = RetentionScore::measure(&tuned, &base, &k);
        assert_eq!(
            (s.questions, s.verbatim, s.base_correct, s.kept, s.gained),
            (4, 1, 3, 2, 1)
        );
        assert_eq!(s.basis(), ScoreBasis::AnswerKeys);
        assert!((s.score() - 2.0 / 3.0).abs() < 1e-12);
        assert!(
            s.describe().contains("2/3 correct base answers kept"),
            "{}",
            s.describe()
        );
        // Without keys (or with a base that got nothing right) the score is verbatim.
        let none = RetentionScore::measure(&tuned, &base, &[]);
        assert_eq!(none.basis(), ScoreBasis::Verbatim);
        assert!((none.score() - 0.25).abs() < 1e-12);
    }

    #[test]
    fn every_builtin_question_has_keys() {
        let set = RetentionSet::builtin();
        assert_eq!(set.questions.len(), set.answer_keys.len());
        assert!(set.answer_keys.iter().all(|k| !k.is_empty()));
    }

    #[test]
    fn jsonl_answer_keys_are_optional_and_checked() {
        let dir = std::env::temp_dir().join(format!("retention-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"2+2?\", \"answers\": [\"4\", \"four\"]}\n{\"prompt\": \"Hi\"}\n",
        )
        .unwrap();
        let set = RetentionSet::from_jsonl(&p).unwrap();
        assert_eq!(set.answer_keys, vec![keys(&["4", "four"]), vec![]]);
        std::fs::write(&p, "{\"prompt\": \"2+2?\", \"answers\": \"4\"}\n").unwrap();
        let e = RetentionSet::from_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains(":1") && e.contains("answers"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn changed_answers_list_every_lost_answer_first() {
        let q = keys(&["Capital of France?", "Opposite of hot?", "Bees make?"]);
        let base = keys(&["It is Paris.", "Cold.", "Honey."]);
        let tuned = keys(&["Cold, really.", "POSITIVE", "Honey."]);
        let k = vec![keys(&["paris"]), keys(&["cold"]), keys(&["honey"])];
        let rows = changed_answers(&q, &base, &tuned, &k);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["question"], "Capital of France?");
        assert_eq!(rows[0]["lost"], true);
        assert_eq!(rows[1]["lost"], true);
    }
}
