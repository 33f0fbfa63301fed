#ifndef OUTBOARD_CREFBLK_H
#define OUTBOARD_CREFBLK_H
int ob_refblk_placeholder(void);
#endif
