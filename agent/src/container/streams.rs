//! A process's stdio: output streams, stdin, terminal size.

use super::*;

impl Containers {
    pub async fn output(&self, id: &str, exec_id: &str, stream: Stream) -> Result<Output, Error> {
        let (_, process) = self.process(id, exec_id).await?;
        Ok(match stream {
            Stream::Stdout => process.stdio.stdout.clone(),
            Stream::Stderr => process.stdio.stderr.clone(),
        })
    }

    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<(), Error> {
        let (_, process) = self.process(id, exec_id).await?;
        let stdin = process.stdio.stdin.lock().await.clone();
        let Some(stdin) = stdin else {
            return Err(Error::Precondition("stdin is closed".into()));
        };
        stdin.write_all(data).await.map_err(Error::Stdin)
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), Error> {
        let (_, process) = self.process(id, exec_id).await?;
        let stdin = process.stdio.stdin.lock().await.take();
        if let (Some(stdin), Some(_)) = (stdin, &process.stdio.tty) {
            // A terminal stays open for output: send end-of-input instead.
            stdin
                .write_all(&[stdio::TTY_EOF])
                .await
                .map_err(Error::Stdin)?;
        }
        Ok(())
    }

    pub async fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), Error> {
        let (_, process) = self.process(id, exec_id).await?;
        let Some(tty) = &process.stdio.tty else {
            return Err(Error::Precondition("the process has no terminal".into()));
        };
        let (Ok(rows), Ok(cols)) = (u16::try_from(rows), u16::try_from(cols)) else {
            return Err(Error::Invalid("terminal size out of range".into()));
        };
        Ok(stdio::resize(tty, rows, cols)?)
    }
}
