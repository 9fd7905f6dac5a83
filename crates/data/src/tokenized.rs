//! Tokenized examples, stored flat, and one example borrowed from them.
/// Tokenized examples stored flat: example `i` is `tokens[starts[i]..starts[i+1]]`, its first
/// `prompt_lens[i]` tokens are the prompt (labels -100), the rest train.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizedSet {
    pub tokens: Vec<u32>,
    pub starts: Vec<u64>,
    pub prompt_lens: Vec<u32>,
    /// (index into [`crate::Dataset::files`], [`crate::Loc::encode`]d place in it) of each example.
    pub origins: Vec<(u32, u64)>,
}

/// One example, borrowed from a [`TokenizedSet`].
#[derive(Debug, Clone, Copy)]
pub struct Example<'a> {
    pub ids: &'a [u32],
    pub prompt_len: usize,
    pub origin: (u32, u64),
}

impl Example<'_> {
    /// Labels aligned with `ids`: -100 over the prompt, the token id over the trained part.
    pub fn labels(&self) -> Vec<i64> {
        self.ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i < self.prompt_len { -100 } else { t as i64 })
            .collect()
    }

    /// The trained ids: the response and its EOS.
    pub fn trained(&self) -> &[u32] {
        &self.ids[self.prompt_len..]
    }
}

impl TokenizedSet {
    pub fn new() -> Self {
        TokenizedSet {
            starts: vec![0],
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.prompt_lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompt_lens.is_empty()
    }

    pub fn push(&mut self, ids: &[u32], prompt_len: usize, origin: (u32, u64)) {
        if self.starts.is_empty() {
            self.starts.push(0);
        }
        self.tokens.extend_from_slice(ids);
        self.starts.push(self.tokens.len() as u64);
        self.prompt_lens.push(prompt_len as u32);
        self.origins.push(origin);
    }

    pub fn get(&self, i: usize) -> Example<'_> {
        let (a, b) = (self.starts[i] as usize, self.starts[i + 1] as usize);
        Example {
            ids: &self.tokens[a..b],
            prompt_len: self.prompt_lens[i] as usize,
            origin: self.origins[i],
        }
    }

    /// Length in tokens of example `i`.
    pub fn len_of(&self, i: usize) -> usize {
        (self.starts[i + 1] - self.starts[i]) as usize
    }

    /// The examples at `indices`, in that order, as a new set.
    pub fn select(&self, indices: &[usize]) -> TokenizedSet {
        let mut out = TokenizedSet::new();
        for &i in indices {
            let e = self.get(i);
            out.push(e.ids, e.prompt_len, e.origin);
        }
        out
    }

    /// Total tokens, and trained tokens.
    pub fn token_counts(&self) -> (u64, u64) {
        let total = self.tokens.len() as u64;
        let prompt: u64 = self.prompt_lens.iter().map(|&p| p as u64).sum();
        (total, total - prompt)
    }
}
